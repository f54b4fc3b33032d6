"""Stage 2: transformers' quantizer swaps Linear/Conv1D for bnb modules before any weight exists."""

from __future__ import annotations

from collections import Counter

from qfinal.formats.bnb import BITSANDBYTES
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage
from qfinal.report import ConvertedModule, Finding, SkippedModule


def _dequantized_on_load(ctx: Context) -> str | None:
    """How the report names a checkpoint qfinal dequantizes while loading, else None."""
    fmt = ctx.dequantizing_format
    if fmt is None:
        return None
    scheme = fmt.scheme(ctx.config_json(), str(ctx.source.folder / "config.json")).label
    dtype = str(ctx.dtype).removeprefix("torch.")
    return f"{scheme} dequantized to {dtype} on load ({ctx.dequantizing_reason})"


class QuantizerPreprocess(BaseStage):
    name = "quantizer_preprocess"

    def run(self, ctx: Context) -> Outcome:
        ctx.report.quantization = BITSANDBYTES.describe_method(ctx.hf_quantizer)
        stored = _dequantized_on_load(ctx)
        if stored:
            method = ctx.report.quantization
            ctx.report.quantization = stored if method == "none" else f"{stored}, then {method}"
            if ctx.hf_quantizer is not None:
                ctx.report.findings.append(
                    Finding(
                        check="quantization_config",
                        severity="warning",
                        message=f"requantizing an already quantized checkpoint ({ctx.dequantizing_format.name}) "
                        f"to {method}: the two rounding errors compound; quantize the original dense weights "
                        "where you have them",
                    )
                )
        if ctx.hf_quantizer is None:
            if stored:
                return Outcome("nothing to do", f"the checkpoint is {stored}; nothing is quantized")
            status = "skipped by request" if ctx.config.quantize.method == "none" else "nothing to do"
            return Outcome(status, "no quantization requested and the checkpoint is not quantized")
        from qfinal.compat import transformers as _hf

        _hf.quantizer_preprocess(
            ctx.hf_quantizer,
            ctx.model,
            ctx.model_class,
            ctx.dtype,
            ctx.device_map,
            [str(p) for p in ctx.inventory.files],
        )
        converted, skipped = BITSANDBYTES.converted_and_skipped(
            ctx.model, ctx.original_classes, ctx.hf_quantizer, ctx.config.quantize.skip_modules
        )
        ctx.report.keys.converted = [ConvertedModule.model_validate(c) for c in converted]
        ctx.report.keys.skipped = [SkippedModule.model_validate(s) for s in skipped]
        counts = Counter(f"{c['from']}->{c['to']}" for c in converted)
        origin = "pre-quantized checkpoint" if ctx.hf_quantizer.pre_quantized else "quantize on load"
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no module converted"
        return Outcome("ran", f"{ctx.report.quantization} ({origin}): {summary}; {len(skipped)} kept")
