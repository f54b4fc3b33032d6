"""Stage 1: config, checkpoint inventory, dtype, and the model skeleton on the meta device."""

from __future__ import annotations

import copy
from contextlib import contextmanager

from qfinal.checkpoint.inventory import inspect_checkpoint
from qfinal.compat import transformers as _hf
from qfinal.errors import QfinalError, SourceError
from qfinal.formats.bnb import BITSANDBYTES
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.model_class import resolve_model_class
from qfinal.pipeline.stages.base import BaseStage


def load_hf_config(folder, raw: dict, trust_remote_code: bool):
    from transformers import AutoConfig

    if "model_type" not in raw:
        raise SourceError(
            "config.json has no 'model_type'",
            where=str(folder / "config.json"),
            hint="regenerate it with save_pretrained",
        )
    with config_json_at_fault(
        folder,
        "config.json cannot be read by transformers",
        "check model_type; custom code needs trust_remote_code: true",
    ):
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)


@contextmanager
def config_json_at_fault(folder, what: str, hint: str = "check the values config.json sets"):
    """transformers interpreting an untrusted config.json (AutoConfig, the quantizer, the model's
    __init__): whatever it raises is the file's fault, exit 2 naming it, as in
    `compat.transformers_layout.conv1d_layout`. qfinal's own refusals pass through."""
    try:
        yield
    except QfinalError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise SourceError(
            f"{what}: {first}",
            where=str(folder / "config.json"),
            hint=hint,
        ) from None


def _dequantize_on_load_if_needed(ctx: Context, hf_config) -> None:
    """A format transformers cannot load faithfully here is dequantized by qfinal while loading:
    the model is then built as the plain one, without transformers' quantizer for that format."""
    from qfinal.formats import format_for

    raw = ctx.config_json()
    fmt = format_for(raw)
    # A refused format is built without its quantizer too: checkpoint_dispatch refuses it with the
    # reason, header-only validate reports it as a finding.
    refused = fmt is not None and fmt.load_refusal(raw)
    reason = fmt.dequantizes_on_load(raw) if fmt is not None and not refused else None
    if not refused and reason is None:
        return
    if reason is not None:
        ctx.dequantizing_format, ctx.dequantizing_reason = fmt, reason
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config


class MetaInit(BaseStage):
    name = "meta_init"

    def run(self, ctx: Context) -> Outcome:
        import torch

        folder = ctx.source.folder
        cfg = ctx.config
        hf_config = load_hf_config(folder, ctx.config_json(), cfg.trust_remote_code)
        ctx.model_class = resolve_model_class(hf_config, cfg.model_class, cfg.task, str(folder / "config.json"))
        ctx.inventory = inspect_checkpoint(folder, allow_pickle=ctx.allow_pickle, confine_to=ctx.source.confine_to)
        if not ctx.tolerate_checkpoint_problems:
            ctx.inventory.raise_for_problems()

        device_map = _hf.check_and_set_device_map(cfg.device_map)
        _dequantize_on_load_if_needed(ctx, hf_config)
        quantization_config = BITSANDBYTES.quantizer_config(cfg.quantize)
        with config_json_at_fault(folder, "transformers cannot use its quantization_config"):
            hf_quantizer, hf_config, device_map = _hf.get_hf_quantizer(
                hf_config, quantization_config, device_map, True, {}
            )
        files = [str(p) for p in ctx.inventory.files]
        dtype = cfg.dtype if cfg.dtype != "auto" else "auto"
        hf_config, dtype = _hf.resolve_dtype(
            dtype, files, hf_config, ctx.inventory.sharded_metadata, None, True, hf_quantizer
        )
        hf_config.name_or_path = str(folder)
        hf_config = copy.deepcopy(hf_config)

        ctx.hf_config, ctx.hf_quantizer, ctx.device_map, ctx.dtype = hf_config, hf_quantizer, device_map, dtype
        # Like `from_pretrained(attn_implementation=...)`: set before the model is built; one
        # transformers cannot run here falls back to the default, recorded as a finding by runtime.
        with config_json_at_fault(folder, f"transformers cannot build {ctx.model_class.__name__} from it"):
            ctx.model, ctx.attn_fallback = _hf.build_skeleton_with_attention(
                ctx.model_class, hf_config, dtype, hf_quantizer is not None, cfg.runtime.attn_implementation
            )
        ctx.original_classes = {n: type(m).__name__ for n, m in ctx.model.named_modules()}

        report = ctx.report
        report.model_class = ctx.model_class.__name__
        report.dtype = str(dtype).removeprefix("torch.")
        report.trust_remote_code = cfg.trust_remote_code
        n_params = sum(p.numel() for p in ctx.model.parameters())
        on_meta = all(p.device == torch.device("meta") for p in ctx.model.parameters())
        where = "meta" if on_meta else "materialized"
        return Outcome(
            "ran",
            f"{ctx.model_class.__name__}, {n_params:,} parameters on {where}, "
            f"{len(files)} {ctx.inventory.format} file(s)",
        )
