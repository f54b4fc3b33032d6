"""Stage 4: the quantizer's finalization, or dequantization back to a plain float model."""

from __future__ import annotations

from qfinal.errors import SourceError
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage


def load_generation_config(model, folder) -> None:
    if not model.can_generate() or not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # an untrusted file transformers cannot parse: its fault, exit 2
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise SourceError(
            f"generation_config.json cannot be read by transformers: {first}",
            where=str(folder / "generation_config.json"),
            hint="repair it, or delete it to use the defaults from config.json",
        ) from None


class Postprocess(BaseStage):
    name = "postprocess"

    def run(self, ctx: Context) -> Outcome:
        model = ctx.model
        model.eval()
        load_generation_config(model, ctx.source.folder)
        q = ctx.hf_quantizer
        if q is None:
            if ctx.dequantized:  # a second run over a finalized model
                return Outcome("nothing to do", "model in eval mode; already dequantized")
            if ctx.config.dequantize:
                from qfinal.errors import CheckpointError

                raise CheckpointError(
                    "dequantize: the checkpoint is not bitsandbytes-quantized",
                    where=str(ctx.source.folder / "config.json"),
                    hint="dequantize reads nf4/fp4/int8 checkpoints; drop dequantize",
                )
            return Outcome("nothing to do", "model in eval mode; no quantizer to finalize")
        model.hf_quantizer = q
        q.postprocess_model(model)
        if not ctx.config.dequantize:
            return Outcome("ran", "quantizer finalized; model in eval mode")
        from qfinal.formats import quantizer_format

        fmt = quantizer_format(ctx.config_json(), q.pre_quantized)
        detail = fmt.dequantize_in_memory(model, ctx.dtype, ctx.original_classes)
        ctx.hf_quantizer = None
        ctx.dequantized = True
        ctx.report.quantization = "none (dequantized)"
        return Outcome("ran", detail)
