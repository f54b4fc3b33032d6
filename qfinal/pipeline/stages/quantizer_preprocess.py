"""Stage 2: transformers' quantizer swaps Linear/Conv1D for quantized modules before any weight exists."""

from __future__ import annotations

from collections import Counter

from qfinal.checkpoint.headers import checkpoint_error
from qfinal.errors import QfinalError
from qfinal.formats import quantizer_format
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
        q = ctx.hf_quantizer
        fmt = quantizer_format(ctx.config_json(), q is not None and q.pre_quantized)
        ctx.report.quantization = fmt.describe_method(q)
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

        try:
            _hf.quantizer_preprocess(
                q, ctx.model, ctx.model_class, ctx.dtype, ctx.device_map, [str(p) for p in ctx.inventory.files]
            )
        except QfinalError:
            raise
        except Exception as err:  # a pre-quantized checkpoint whose metadata its quantizer cannot use
            if not q.pre_quantized:
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise checkpoint_error(  # named as the header checks name theirs: validate reports it
                f"transformers' {fmt.name} quantizer cannot prepare the model from this checkpoint: {first}",
                file=str(ctx.source.folder),
                check="quantization_config",
                hint="re-export the quantized checkpoint",
            ) from None
        converted, skipped = fmt.converted_and_skipped(
            ctx.model, ctx.original_classes, ctx.hf_quantizer, ctx.config.quantize.skip_modules
        )
        ctx.report.keys.converted = [ConvertedModule.model_validate(c) for c in converted]
        ctx.report.keys.skipped = [SkippedModule.model_validate(s) for s in skipped]
        counts = Counter(f"{c['from']}->{c['to']}" for c in converted)
        origin = "pre-quantized checkpoint" if ctx.hf_quantizer.pre_quantized else "quantize on load"
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no module converted"
        return Outcome("ran", f"{ctx.report.quantization} ({origin}): {summary}; {len(skipped)} kept")
