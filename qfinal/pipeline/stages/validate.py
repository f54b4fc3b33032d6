"""Stage 7: the named checks on the finalized model."""

from __future__ import annotations

from qfinal.checks import core as checks
from qfinal.pipeline.context import Context, Outcome
from qfinal.checkpoint.sources import read_config_json
from qfinal.pipeline.stages.base import BaseStage, unwrap


def checkpoint_reader(inventory, root):
    """Read one tensor from the checkpoint by key (used to compare both halves of a tie)."""
    from safetensors import safe_open

    def read(key):
        entry = inventory.tensors[key]
        with safe_open(str(root / entry.file), framework="pt") as fh:
            return fh.get_tensor(key)

    return read


def checkpoint_lookup(tensors: dict, base_model_prefix: str):
    """model key -> checkpoint key, allowing for the base-model prefix transformers adds or strips."""
    prefix = f"{base_model_prefix}." if base_model_prefix else None

    def lookup(key: str) -> str | None:
        if key in tensors:
            return key
        if prefix:
            if key.startswith(prefix) and key[len(prefix):] in tensors:
                return key[len(prefix):]
            if prefix + key in tensors:
                return prefix + key
        return None

    return lookup


class Validate(BaseStage):
    name = "validate"

    def run(self, ctx: Context) -> Outcome:
        vcfg = ctx.config.validate_
        if not vcfg.enabled and not ctx.scratch.get("validate_command"):
            return Outcome("skipped by request", "validate.enabled is false")
        from qfinal.ops.validate import _keep_fp32, prequantized_modules

        # Under unmerged adapters ctx.model is a PeftModel, whose names carry a prefix; the LoRA layers
        # live inside the base model, so its parameters are checked too.
        model, report, info, inventory = unwrap(ctx.model), ctx.report, ctx.loading_info, ctx.inventory
        raw = read_config_json(ctx.source.folder)
        skipped: dict[str, str] = {}
        findings = checks.key_findings(info.missing_keys, info.unexpected_keys, info.mismatched_keys,
                                       vcfg.allow_missing, vcfg.allow_unexpected)
        findings += checks.inventory_findings(inventory)
        has_headers = inventory.format == "safetensors"
        lookup = checkpoint_lookup(inventory.tensors, model.base_model_prefix) if has_headers else None
        if has_headers:
            findings += checks.dtype_findings(raw, inventory, _keep_fp32(model))
            findings += checks.quantization_findings(raw, inventory, prequantized_modules(raw, report), lookup)
        else:
            why = "pickle weights have no header to compare with"
            skipped.update(dtype_consistency=why, quantization_config=why)
        reader = checkpoint_reader(inventory, ctx.source.folder) if has_headers else None
        ties = checks.declared_ties(model)
        findings += checks.tie_findings(ties, lookup, model=model, read_tensor=reader,
                                        tie_enabled=ctx.config.tie_weights,
                                        offload_index=ctx.disk_offload_index)
        findings += checks.meta_findings(model, set(info.missing_keys), ties)
        if vcfg.check_nan:
            findings += checks.nan_findings(model, ctx.prescan)
        else:
            skipped["nan_inf"] = "validate.check_nan is false"
        report.findings.extend(findings)
        ran = set(checks.FULL_MODE_CHECKS) | ({"adapter_coverage"} if ctx.config.adapters else set())
        report.checks = [c for c in checks.CHECKS if c in ran and c not in skipped]
        if skipped:
            report.extra["skipped_checks"] = skipped
        errors = sum(f.severity == "error" for f in report.findings)
        warnings = sum(f.severity == "warning" for f in report.findings)
        return Outcome("ran", f"{len(report.checks)} check(s): {errors} error(s), {warnings} warning(s)")
