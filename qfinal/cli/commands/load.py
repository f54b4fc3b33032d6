from __future__ import annotations

from typing import Annotated, Optional

import typer

from qfinal.cli.options import (
    AdapterOpt,
    AllowPickleOpt,
    ConfigOpt,
    DequantizeOpt,
    DeviceMapOpt,
    DoubleQuantOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    MergeOpt,
    OfflineOpt,
    OffloadOpt,
    QuantizeOpt,
    QuietOpt,
    RevisionOpt,
    StopAfterOpt,
    run_config,
)


def load(
    source: Annotated[str, typer.Argument(help="Model folder, a hub id (org/name[@revision]), or 'demo'.")],
    config: ConfigOpt = None,
    quantize: QuantizeOpt = None,
    double_quant: DoubleQuantOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    adapter: AdapterOpt = None,
    merge: MergeOpt = False,
    dequantize: DequantizeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    stop_after: StopAfterOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
    quality: Annotated[
        bool,
        typer.Option(
            "--quality",
            help="After quantizing, compare each quantized weight with "
            "the checkpoint's original and chart the relative error by layer "
            "(also: report.quality: true in the config).",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Plan only: modules to convert, device map and "
            "bytes per device, reading no tensor data (= qfinal plan).",
        ),
    ] = False,
    html: Annotated[
        Optional[str],
        typer.Option(
            "--html", help="Write the --quality chart as a self-contained HTML page to FILE (implies --quality)."
        ),
    ] = None,
) -> int:
    """Load SOURCE through the staged pipeline and report every stage, key and finding."""
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.load import load as run_load
    from qfinal.pipeline.runner import STAGE_NAMES

    out = Output(json_path=json, quiet=quiet)
    cfg = run_config(config, locals())
    if html:
        from qfinal.cli.options import check_output_file

        check_output_file(html, "--html")
    quiet_libraries()
    if dry_run:
        from qfinal.ops.plan import plan

        report = plan(source, cfg)
        out.report(report)
        raise typer.Exit(0 if report.ok else 1)
    with out.stages(list(STAGE_NAMES)) as on_stage:
        result = run_load(
            source, cfg, allow_pickle=allow_pickle, on_stage=on_stage, on_progress=on_stage.within if on_stage else None
        )
    rows = None
    if quality or html or cfg.report.quality:
        from qfinal.ops.quality import add_quality
        from qfinal.render.quality import render_quality, write_quality_html

        rows = add_quality(result)
        if html:
            write_quality_html(rows, html, f"qfinal load --quality: {source}")
    out.report(result.report)
    if rows and not out.quiet:
        render_quality(rows, out.console)
    raise typer.Exit(0 if result.report.ok else 1)
