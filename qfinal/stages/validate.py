"""Stage 7: the named checks on the finalized model."""

from __future__ import annotations

from .. import checks
from ..pipeline import Context, Outcome
from ..sources import read_config_json
from .base import BaseStage


def checkpoint_reader(inventory, root):
    """Read one tensor from the checkpoint by key (used to compare both halves of a tie)."""
    from safetensors import safe_open

    def read(key):
        entry = inventory.tensors[key]
        with safe_open(str(root / entry.file), framework="pt") as fh:
            return fh.get_tensor(key)

    return read


class Validate(BaseStage):
    name = "validate"

    def run(self, ctx: Context) -> Outcome:
        vcfg = ctx.config.validate_
        if not vcfg.enabled:
            return Outcome("skipped by request", "validate.enabled is false")
        model, keys, info = ctx.model, ctx.report.keys, ctx.loading_info
        raw = read_config_json(ctx.source.folder)
        findings = checks.key_findings(info.missing_keys, info.unexpected_keys, info.mismatched_keys,
                                       vcfg.allow_missing, vcfg.allow_unexpected)
        findings += checks.inventory_findings(ctx.inventory)
        findings += checks.dtype_findings(raw, ctx.inventory, getattr(model, "_keep_in_fp32_modules", None))
        findings += checks.quantization_findings(raw, ctx.inventory)
        reader = checkpoint_reader(ctx.inventory, ctx.source.folder) if ctx.inventory.format == "safetensors" else None
        findings += checks.tie_findings(model, keys.tied, raw, ctx.inventory, reader)
        findings += checks.meta_findings(model, set(info.missing_keys), {t.target for t in keys.tied})
        if vcfg.check_nan:
            findings += checks.nan_findings(model)
        ctx.report.findings.extend(findings)
        ran = set(checks.FULL_MODE_CHECKS) | ({"adapter_coverage"} if ctx.config.adapters else set())
        ctx.report.checks = [c for c in checks.CHECKS if c in ran]
        errors = sum(f.severity == "error" for f in ctx.report.findings)
        warnings = sum(f.severity == "warning" for f in ctx.report.findings)
        return Outcome("ran", f"{errors} error(s), {warnings} warning(s)")
