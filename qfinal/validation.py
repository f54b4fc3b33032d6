"""`qfinal validate`: the CI gate. Full mode runs the pipeline; fast mode reads only headers.

Checkpoint-level defects (bad headers, index disagreements, escaping shard paths) are the
gate's findings here, exit 1, where every other command refuses them with exit 2.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from . import checks
from .api import _config
from .config import RunConfig
from .pipeline import Context, run_pipeline
from .report import Report, StageRecord
from .sources import read_config_json, resolve_source


def validate(source: str | Path, config: RunConfig | str | Path | None = None, *, fast: bool = False,
             allow_pickle: bool = False, on_stage: Callable[[str], None] | None = None,
             **overrides: Any) -> Report:
    cfg = _config(config, overrides)
    src = resolve_source(source)
    report = Report(source=src.label, command="validate --fast" if fast else "validate")
    ctx = Context(source=src, config=cfg, report=report, allow_pickle=allow_pickle)
    ctx.scratch["tolerate_checkpoint_problems"] = True
    if not fast:
        from .safety import inspect_checkpoint

        inventory = inspect_checkpoint(src.folder, allow_pickle=allow_pickle, confine_to=src.confine_to)
        if not inventory.problems:
            run_pipeline(ctx, on_stage=on_stage)
            return report
        report.extra["full_mode"] = "not possible: the checkpoint files are broken; header checks only"
    _run_fast(ctx, on_stage)
    return report


def _run_fast(ctx: Context, on_stage) -> None:
    from .pipeline import default_stages

    stages = [s for s in default_stages() if s.name in ("meta_init", "quantizer_preprocess")]
    run_pipeline(ctx, stages, on_stage=on_stage)
    import time

    start = time.perf_counter()
    ctx.report.findings.extend(fast_findings(ctx))
    ctx.report.checks = list(checks.FAST_MODE_CHECKS)
    from .pipeline import peak_rss_bytes

    ctx.report.stages.append(StageRecord(name="validate", seconds=round(time.perf_counter() - start, 6),
                                         peak_rss_bytes=peak_rss_bytes(), detail="header-only checks"))


def fast_findings(ctx: Context) -> list:
    """Compare the meta skeleton with the safetensors headers: keys, shapes, dtypes, ties."""
    from . import _hf

    model, inventory, vcfg = ctx.model, ctx.inventory, ctx.config.validate_
    raw = read_config_json(ctx.source.folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not checks.is_quant_state_key(k)}
    quantized_weights = {f"{c.module}.weight" for c in ctx.report.keys.converted}
    present = {k: e for k, e in inventory.tensors.items() if not checks.is_quant_state_key(k)}
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})

    missing = {k for k in expected if k not in present}
    for target, source in ties.items():
        if target in missing and source in present:
            missing.discard(target)
        elif source in missing and target in present:
            missing.discard(source)
    unexpected = {k for k in present if k not in expected}
    info = SimpleNamespace(missing_keys=missing, unexpected_keys=unexpected)
    _hf.adjust_keys(model, info)
    mismatched = {(k, present[k].shape, expected[k]) for k in expected
                  if k in present and k not in quantized_weights and tuple(present[k].shape) != expected[k]}
    findings = checks.key_findings(info.missing_keys, info.unexpected_keys, mismatched,
                                   vcfg.allow_missing, vcfg.allow_unexpected)
    findings += checks.inventory_findings(inventory)
    findings += checks.dtype_findings(raw, inventory, getattr(model, "_keep_in_fp32_modules", None))
    findings += checks.quantization_findings(raw, inventory)
    findings += _fast_tie_findings(ties, present)
    return findings


def _fast_tie_findings(ties: dict, present: dict) -> list:
    out = []
    for target, source in sorted(ties.items()):
        both = target in present and source in present
        if both:
            out.append(checks.Finding(check="tie_audit", severity="warning", key=target,
                                      message=f"checkpoint stores both {target} and {source}; tying keeps "
                                              f"{source} only (fast mode cannot compare their data)"))
        elif target not in present and source not in present:
            out.append(checks.Finding(check="tie_audit", severity="error", key=target,
                                      message=f"neither {target} nor {source} is in the checkpoint"))
        else:
            out.append(checks.Finding(check="tie_audit", severity="info", key=target,
                                      message=f"{target} <- {source}: the checkpoint stores one copy"))
    return out
