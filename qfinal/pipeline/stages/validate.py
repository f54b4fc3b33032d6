"""Stage 7: the named checks on the finalized model."""

from __future__ import annotations

from qfinal.adapters.peft_model import base_model_of
from qfinal.checks.keys import checkpoint_lookup, dtype_findings, inventory_findings, key_findings
from qfinal.checks.names import CHECKS, FULL_MODE_CHECKS
from qfinal.checks.nan import nan_findings
from qfinal.checks.quant import prequantized_modules, quantization_findings
from qfinal.checks.ties import declared_ties, meta_findings, tie_findings
from qfinal.compat.transformers import keep_in_fp32_modules
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage


def checkpoint_reader(inventory, root):
    """Read one tensor from the checkpoint by key (used to compare both halves of a tie)."""
    from qfinal.checkpoint.reader import TensorReader

    return TensorReader.for_inventory(inventory, root, max_open=0).get


class Validate(BaseStage):
    name = "validate"

    def run(self, ctx: Context) -> Outcome:
        vcfg = ctx.config.validate_
        if not vcfg.enabled and not ctx.validate_command:
            return Outcome("skipped by request", "validate.enabled is false")
        # Under unmerged adapters ctx.model is a PeftModel, whose names carry a prefix; the LoRA layers
        # live inside the base model, so its parameters are checked too.
        model, report, info, inventory = base_model_of(ctx.model), ctx.report, ctx.loading_info, ctx.inventory
        raw = ctx.config_json()
        skipped: dict[str, str] = {}
        findings = key_findings(
            info.missing_keys, info.unexpected_keys, info.mismatched_keys, vcfg.allow_missing, vcfg.allow_unexpected
        )
        findings += inventory_findings(inventory)
        has_headers = inventory.format == "safetensors"
        lookup = checkpoint_lookup(inventory.tensors, model.base_model_prefix) if has_headers else None
        if has_headers:
            findings += dtype_findings(raw, inventory, keep_in_fp32_modules(model))
            findings += quantization_findings(raw, inventory, prequantized_modules(raw, report), lookup)
        else:
            why = "pickle weights have no header to compare with"
            skipped.update(dtype_consistency=why, quantization_config=why)
        reader = checkpoint_reader(inventory, ctx.source.folder) if has_headers else None
        ties = declared_ties(model)
        findings += tie_findings(
            ties,
            lookup,
            model=model,
            read_tensor=reader,
            tie_enabled=ctx.config.tie_weights,
            offload_index=ctx.disk_offload_index,
        )
        findings += meta_findings(model, set(info.missing_keys), ties)
        if vcfg.check_nan:
            findings += nan_findings(model, ctx.prescan)
        else:
            skipped["nan_inf"] = "validate.check_nan is false"
        report.findings.extend(findings)
        ran = set(FULL_MODE_CHECKS) | ({"adapter_coverage"} if ctx.config.adapters else set())
        report.checks = [c for c in CHECKS if c in ran and c not in skipped]
        if skipped:
            report.extra["skipped_checks"] = skipped
        errors = sum(f.severity == "error" for f in report.findings)
        warnings = sum(f.severity == "warning" for f in report.findings)
        return Outcome("ran", f"{len(report.checks)} check(s): {errors} error(s), {warnings} warning(s)")
