"""`qfinal diff A B`: load two sides through the pipeline and compare them with the one engine.

A side is a model folder, a hub id in the local cache, or a pipeline config YAML, optionally with a
config file of its own (`--config-a` / `--config-b`), so a side can be "this checkpoint, quantized
to nf4". A side given as a YAML file may name its model with a top-level `source:` key (a path,
relative to the YAML file's folder when that exists, or a cached hub id); without `source:` it
means "the other side's model, loaded with this config".

Direction follows `qfinal.compare`: **A is the candidate, B the reference**.
`rel_error = ||A - B||_F / ||B||_F`, `KL = KL(p_B || p_A)`; so `qfinal diff quantized original`
measures what quantizing lost. Values are compared dequantized (bitsandbytes weights through bnb's
own dequantization, Conv1D weights in Linear layout) unless `raw` is asked for.

The outputs are compared on the fixed probe batch (`qfinal.compare.outputs.probe_batch`): a CPU
`torch.Generator` seeded 0 draws 2 x 16 token ids uniformly in [0, min(vocab, 32000)), fewer
positions if the model has fewer; encoder-decoders also get `decoder_input_ids`, the next 2 x 16
draw; no attention mask. Same config, same tensors, on any machine.

The result is a `Report` (command "diff") with findings `diff_keys`, `diff_tensors`, `diff_logits`
from `Comparison.findings("diff", tolerances)`, the non-info findings of each side's own load
(message prefixed "A: " / "B: "), and the whole per-tensor table in `report.extra["diff"]`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from qfinal.config import RunConfig, build_config, read_yaml
from qfinal.errors import ConfigError
from qfinal.report import Report, StageRecord

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Side:
    """One resolved side: where the model comes from and the config it is loaded with."""

    name: str  # "A" | "B"
    argument: str  # as given on the command line
    source: str  # folder or hub id handed to qfinal.load
    config: RunConfig
    config_file: str | None  # the YAML the config came from (positional or --config-x)

    @property
    def label(self) -> str:
        if self.config_file and self.config_file != self.argument:
            return f"{self.source} + {self.config_file}"
        if self.config_file:
            return f"{self.argument} ({self.source})"
        return self.source

    def describe(self) -> dict:
        return {
            "argument": self.argument,
            "source": self.source,
            "config_file": self.config_file,
            "quantize": self.config.quantize.method,
            "dtype": self.config.dtype,
        }


@dataclass
class DiffResult:
    report: Report
    comparison: Any  # qfinal.compare.Comparison
    tolerances: Any  # qfinal.compare.Tolerances
    sides: tuple[Side, Side]

    @property
    def ok(self) -> bool:
        return self.report.ok


# ----------------------------------------------------------------------------------- tolerances


def make_tolerances(
    *,
    max_abs: float | None = None,
    rel_error: float | None = None,
    logits_max_abs: float | None = None,
    min_top1: float | None = None,
    max_kl: float | None = None,
    allow_dtype_change: bool = False,
):
    """Tolerances from the CLI's options (None keeps the exact-equality default), validated."""
    from qfinal.compare.tensors import Tolerances

    values = {"max_abs": max_abs, "rel_error": rel_error, "logits_max_abs": logits_max_abs, "max_kl": max_kl}
    for name, value in values.items():
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"must be a finite number >= 0, got {value}", where=f"--{name.replace('_', '-')}")
    if min_top1 is not None and not (0.0 <= min_top1 <= 1.0):
        raise ConfigError(f"must be between 0 and 1, got {min_top1}", where="--min-top1")
    kwargs = {k: v for k, v in {**values, "min_top1": min_top1}.items() if v is not None}
    return Tolerances(allow_dtype_change=allow_dtype_change, **kwargs)


# ---------------------------------------------------------------------------------------- sides


def _is_yaml(argument: str) -> bool:
    path = Path(argument).expanduser()
    return path.suffix.lower() in YAML_SUFFIXES and path.is_file()


def _validated(data: dict, where: str) -> RunConfig:
    from pydantic import ValidationError

    from qfinal.config import format_errors

    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err), where=where, hint="see the config reference in README.md") from None


def _yaml_side(argument: str) -> tuple[str | None, dict]:
    """(source or None, the rest of the YAML) of a side given as a pipeline config file."""
    path = Path(argument).expanduser()
    data = dict(read_yaml(path))
    source = data.pop("source", None)
    if source is not None:
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(
                "`source` must be a model folder or a cached hub id (a string)", where=f"{argument}: source"
            )
        near = path.parent / source
        if not Path(source).is_absolute() and near.exists():
            source = str(near)
    return source, data


def resolve_sides(a: str, b: str, config_a: str | None = None, config_b: str | None = None) -> tuple[Side, Side]:
    """Turn the two arguments (+ optional config files) into two sides; nothing is loaded yet."""
    parsed: dict[str, tuple[str | None, RunConfig | None, str | None]] = {}
    for name, arg, cfg_file in (("A", a, config_a), ("B", b, config_b)):
        if _is_yaml(arg):
            if cfg_file:
                raise ConfigError(
                    f"side {name} is already a config file",
                    where=f"--config-{name.lower()}",
                    hint=f"put the options in {arg}, or pass a model folder as {name}",
                )
            source, data = _yaml_side(arg)
            parsed[name] = (source, _validated(data, arg), arg)
        else:
            parsed[name] = (arg, build_config(cfg_file) if cfg_file else build_config(None), cfg_file)
    (src_a, cfg_a, file_a), (src_b, cfg_b, file_b) = parsed["A"], parsed["B"]
    if src_a is None and src_b is None:
        raise ConfigError(
            "neither side names a model",
            where=f"{a}, {b}",
            hint="add `source: <model folder>` to one YAML, or pass a model folder as A or B",
        )
    if src_a is None:
        src_a = src_b
    if src_b is None:
        src_b = src_a
    return (Side("A", a, src_a, cfg_a, file_a), Side("B", b, src_b, cfg_b, file_b))


# ---------------------------------------------------------------------------------------- diff


def _pair(x: str | None, y: str | None) -> str | None:
    if x == y:
        return x
    return f"{x or '?'} vs {y or '?'}"


def diff(
    a: str,
    b: str,
    *,
    config_a: str | None = None,
    config_b: str | None = None,
    tolerances=None,
    outputs: bool = True,
    raw: bool = False,
    allow_pickle: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> DiffResult:
    """Load A and B through the pipeline and compare them (A candidate, B reference).

    `raw=True` compares the stored state dicts bit for bit (packed bnb data as stored) instead of
    dequantized values. Raises QfinalError (exit 2) when a side cannot be loaded."""
    from qfinal.compare.tensors import Tolerances

    tol = tolerances if tolerances is not None else Tolerances()
    side_a, side_b = resolve_sides(a, b, config_a, config_b)
    report = Report(source=f"{side_a.label} vs {side_b.label}", command="diff")
    results = _load_sides(report, (side_a, side_b), allow_pickle, on_step)
    ra, rb = results
    _merge_side_reports(report, (side_a, side_b), results)
    _require_in_memory((side_a, side_b), results)
    if on_step:
        on_step("compare")
    comparison, findings = _compare(report, ra.model, rb.model, tol, raw=raw, outputs=outputs)
    report.extra["diff"] = _diff_data(comparison, findings, tol, raw, (side_a, side_b))
    del results, ra, rb
    return DiffResult(report=report, comparison=comparison, tolerances=tol, sides=(side_a, side_b))


def _load_sides(report: Report, sides: tuple[Side, Side], allow_pickle: bool, on_step) -> list:
    """Each side through the pipeline, one stage record each; QfinalError when a side cannot load."""
    from qfinal.ops.load import load
    from qfinal.pipeline.context import peak_rss_bytes

    results = []
    for side in sides:
        if on_step:
            on_step(f"load {side.name}")
        start = time.perf_counter()
        result = load(side.source, side.config, allow_pickle=allow_pickle, command=f"diff ({side.name})")
        report.stages.append(
            StageRecord(
                name=f"load {side.name}",
                seconds=round(time.perf_counter() - start, 6),
                peak_rss_bytes=peak_rss_bytes(),
                detail=f"{result.report.model_class}, {result.report.quantization}, "
                f"{result.report.dtype}: {side.label}",
            )
        )
        results.append(result)
    return results


def _merge_side_reports(report: Report, sides: tuple[Side, Side], results: list) -> None:
    """The sides' model class, quantization and dtype ("x vs y" where they differ), and the
    non-info findings of each side's own load, prefixed with the side's name."""
    ra, rb = results
    report.model_class = _pair(ra.report.model_class, rb.report.model_class)
    report.quantization = _pair(ra.report.quantization, rb.report.quantization) or "none"
    report.dtype = _pair(ra.report.dtype, rb.report.dtype)
    report.trust_remote_code = ra.report.trust_remote_code or rb.report.trust_remote_code
    for side, result in zip(sides, results):
        for f in result.report.findings:
            if f.severity != "info":
                report.findings.append(f.model_copy(update={"message": f"{side.name}: {f.message}"}))


def _require_in_memory(sides: tuple[Side, Side], results: list) -> None:
    for side, result in zip(sides, results):
        if any(p.device.type == "meta" for p in result.model.parameters()):
            raise ConfigError(
                "some weights are on the meta device (offloaded to disk, or the pipeline "
                "stopped early); diff needs every weight in memory",
                where=f"side {side.name}",
                hint="load it without offload_folder / stop_after",
            )


def _compare(report: Report, model_a, model_b, tol, *, raw: bool, outputs: bool):
    """The comparison and its findings, both added to the report with the "compare" stage record."""
    from qfinal.compare.models import compare_models
    from qfinal.pipeline.context import peak_rss_bytes

    start = time.perf_counter()
    comparison = compare_models(model_a, model_b, dequantize=not raw, outputs=outputs)
    findings = comparison.findings("diff", tol)
    report.findings.extend(findings)
    report.checks = sorted({f.check for f in findings})
    counts: dict[str, int] = {}
    for t in comparison.tensors:
        counts[t.status] = counts.get(t.status, 0) + 1
    report.stages.append(
        StageRecord(
            name="compare",
            seconds=round(time.perf_counter() - start, 6),
            peak_rss_bytes=peak_rss_bytes(),
            detail=", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + ("" if comparison.output is None else f"; logits on {comparison.output.positions} positions"),
        )
    )
    return comparison, findings


def _diff_data(comparison, findings: list, tol, raw: bool, sides: tuple[Side, Side]) -> dict:
    """`report.extra["diff"]`: the per-tensor table, the verdict, the mode, both sides and the probe."""
    from qfinal.compare.outputs import probe_description

    data = comparison.to_json_dict()
    data.update(
        within_tolerances=not any(f.severity == "error" and f.check.startswith("diff_") for f in findings),
        mode="raw" if raw else "dequantized",
        direction="A is the candidate, B the reference",
        tolerances=asdict(tol),
        a=sides[0].describe(),
        b=sides[1].describe(),
        probe=probe_description(),
    )
    return data


__all__ = ["Side", "DiffResult", "diff", "resolve_sides", "make_tolerances"]
