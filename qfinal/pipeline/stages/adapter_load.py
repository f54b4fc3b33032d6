"""Stage 6: PEFT adapters on the finalized base, with key coverage so a silent no-op is caught."""

from __future__ import annotations

from qfinal.config import RunConfig
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage
from qfinal.report import Finding


class AdapterLoad(BaseStage):
    name = "adapter_load"

    def check(self, config: RunConfig) -> None:
        """Refuse, from each adapter_config.json, what peft cannot do: merging a type that has no
        merge (prompt tuning, prefix tuning, p-tuning, ...), and the bitsandbytes combinations."""
        if not config.load_adapters or not config.adapters:
            return
        from qfinal.adapters.prepare import check_adapter_configs

        method = config.quantize.method
        check_adapter_configs(
            config.adapters, quant=None if method == "none" else method, requantize=config.merge_requantize
        )

    def run(self, ctx: Context) -> Outcome:
        specs = ctx.config.adapters
        if not ctx.config.load_adapters:
            return Outcome("skipped by request", f"load_adapters is false; {len(specs)} configured adapter(s) left off")
        if not specs:
            return Outcome("nothing to do", "no adapters configured")
        from qfinal.adapters.apply import apply_adapters
        from qfinal.adapters.peft_model import is_peft_model
        from qfinal.adapters.prepare import AdapterSpec

        model = ctx.model
        # A second run must neither double-wrap a PeftModel nor merge the same delta twice.
        if is_peft_model(model) or getattr(model, "_qfinal_adapters_applied", False):
            return Outcome("nothing to do", "adapters already applied to this model")
        merge_into_quantized = (
            ctx.hf_quantizer is not None and any(a.merge for a in specs) and not ctx.config.merge_requantize
        )
        if merge_into_quantized:
            # Dequantize here rather than inside peft's merge, so GPT-2's Conv1D layout is
            # restored and every tensor ends in one dtype, exactly as `dequantize: true` does.
            from qfinal.formats import quantizer_format

            fmt = quantizer_format(ctx.config_json(), ctx.hf_quantizer.pre_quantized)
            detail = fmt.dequantize_in_memory(model, ctx.dtype, ctx.original_classes)
            ctx.report.findings.append(
                Finding(
                    check="adapter_merge",
                    severity="info",
                    message=f"quantized base dequantized before merging ({detail}); the merged weights stay in "
                    f"{ctx.report.dtype} (set merge_requantize: true to quantize them again)",
                )
            )
            ctx.hf_quantizer = None
            ctx.dequantized = True
            ctx.report.quantization = "none (dequantized to merge adapters)"
        model, records, findings = apply_adapters(
            model,
            [AdapterSpec(path=a.path, name=a.name, merge=a.merge, scale=a.scale) for a in specs],
            requantize=ctx.config.merge_requantize,
            allow_pickle=ctx.allow_pickle,
        )
        model._qfinal_adapters_applied = True
        ctx.model = model
        ctx.report.adapters = list(records)
        ctx.report.findings.extend(findings)
        merged = sum(r.merged for r in records)
        matched = sum(r.matched for r in records)
        return Outcome("ran", f"{len(records)} adapter(s), {matched} tensor(s) placed, {merged} merged")
