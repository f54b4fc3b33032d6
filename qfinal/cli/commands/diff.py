from __future__ import annotations

from typing import Annotated, Optional

import typer

from qfinal.cli.options import AllowPickleOpt, JsonOpt, QuietOpt, check_output_file, output_path

_SIDE = (
    "Model folder, hub id, or pipeline config YAML (a YAML may name its model "
    "with `source:`; without it, it is the other side's model loaded with that config)."
)


def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="The candidate. " + _SIDE)],
    b: Annotated[str, typer.Argument(metavar="B", help="The reference. " + _SIDE)],
    config_a: Annotated[
        Optional[str],
        typer.Option("--config-a", help="Pipeline config YAML for A (e.g. one with quantize.method: nf4)."),
    ] = None,
    config_b: Annotated[Optional[str], typer.Option("--config-b", help="Pipeline config YAML for B.")] = None,
    max_abs: Annotated[
        Optional[float], typer.Option("--max-abs", help="Largest allowed |A-B| of any element of a tensor. Default 0.")
    ] = None,
    rel_error: Annotated[
        Optional[float], typer.Option("--rel-error", help="Largest allowed ||A-B||/||B|| per tensor. Default 0.")
    ] = None,
    logits_max_abs: Annotated[
        Optional[float],
        typer.Option("--logits-max-abs", help="Largest allowed |logit difference| on the probe batch. Default 0."),
    ] = None,
    min_top1: Annotated[
        Optional[float],
        typer.Option("--min-top1", help="Smallest allowed top-1 agreement (0..1) on the probe batch. Default 1."),
    ] = None,
    max_kl: Annotated[
        Optional[float],
        typer.Option("--max-kl", help="Largest allowed mean KL(p_B||p_A). Default: reported, not judged."),
    ] = None,
    allow_dtype_change: Annotated[
        bool,
        typer.Option(
            "--allow-dtype-change", help="A tensor whose dtype differs passes if its values are within tolerance."
        ),
    ] = False,
    outputs: Annotated[
        bool, typer.Option("--outputs/--no-outputs", help="Compare logits on the probe batch (one forward per side).")
    ] = True,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="Compare the stored state dicts bit for bit (bnb packed "
            "data as stored) instead of dequantized values.",
        ),
    ] = False,
    top: Annotated[int, typer.Option("--top", help="How many of the worst tensors the terminal table shows.")] = 15,
    html: Annotated[Optional[str], typer.Option("--html", help="Write a self-contained HTML report to FILE.")] = None,
    allow_pickle: AllowPickleOpt = False,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Compare two models tensor by tensor and on a fixed probe batch; exit 1 when they differ.

    Both sides go through the same pipeline as `qfinal load`, so a side can be a checkpoint plus a
    config (`qfinal diff ckpt ckpt --config-a configs/nf4.yaml` measures what nf4 loses). Tensors
    are aligned by name; bitsandbytes weights are dequantized with bnb's own functions and GPT-2
    Conv1D weights put in Linear layout, so a quantized model lines up with its float original.
    Per tensor: only in A/B, shape or dtype change, bit-identical or not, max abs difference and
    relative error ||A-B||/||B|| (float64). Outputs: logits max abs difference, mean KL(p_B||p_A)
    and top-1 agreement on the probe batch: 2 x 16 token ids drawn by a CPU torch.Generator seeded 0,
    uniformly in [0, min(vocab, 32000)) (encoder-decoders: the next 2 x 16 draw as decoder input),
    no attention mask.

    Tolerances default to exact equality; a quantization gate might be `--rel-error 0.15 --max-abs 0.1
    --logits-max-abs 1 --min-top1 0.9` (nf4 loses about 9% per weight, fp4 12%, int8 0.6%).
    Exit 0: identical or within the tolerances; 1: beyond them (or a side's load reported an error
    finding); 2: bad input (a path, a YAML, an option).
    """
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.errors import ConfigError
    from qfinal.ops.diff import diff as run_diff
    from qfinal.ops.diff import make_tolerances

    tolerances = make_tolerances(
        max_abs=max_abs,
        rel_error=rel_error,
        logits_max_abs=logits_max_abs,
        min_top1=min_top1,
        max_kl=max_kl,
        allow_dtype_change=allow_dtype_change,
    )
    if top < 0:
        raise ConfigError(f"must be >= 0, got {top}", where="--top")
    for path, opt in ((html, "--html"), (json if json != "-" else None, "--json")):
        if path:
            check_output_file(path, opt)
    out = Output(json_path=json, quiet=quiet)
    quiet_libraries()
    with out.stages(["load A", "load B", "compare"]) as on_step:
        result = run_diff(
            a,
            b,
            config_a=config_a,
            config_b=config_b,
            tolerances=tolerances,
            outputs=outputs,
            raw=raw,
            allow_pickle=allow_pickle,
            on_step=on_step,
        )
    report = result.report
    if html:
        from qfinal.checkpoint.atomic import write_text_atomic
        from qfinal.render.html import render_html

        write_text_atomic(
            output_path(html),
            render_html(result.comparison, f"qfinal diff: {result.sides[0].label} vs {result.sides[1].label}"),
        )
        report.extra["diff"]["html"] = html
    if out.json_path and not out.json_to_stdout:
        from qfinal.render.json_report import write_json

        write_json(report, output_path(out.json_path))
    if out.json_to_stdout:
        import sys

        from qfinal.render.json_report import to_json

        sys.stdout.write(to_json(report))
    elif not out.quiet:
        from qfinal.render.diff_view import render

        render(report, result.comparison, tolerances, out.console, top=top)
    raise typer.Exit(0 if report.ok else 1)
