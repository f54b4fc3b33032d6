"""`load --quality`: each bitsandbytes-quantized module's error against its original weight, and
the layer/stack/module-type parsing of module names that the per-layer views group by."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from qfinal.compare.tensors import abbreviate_names, value_stats
from qfinal.compare.views import DequantView, conv1d_cls, dequantize_module_weight, is_model, quant_kind, quant_label


@dataclass
class LayerQuality:
    """One bitsandbytes-quantized module against its original float weight (`load --quality`).

    `layer` is the first `.N.` index in the name (`model.layers.3.self_attn.q_proj` -> 3,
    `transformer.h.3.attn.c_attn` -> 3), `stack` what precedes it (`model.layers`, `encoder.block`),
    `module_type` the last name component (`q_proj`, `c_attn`, `wi`). rel_error is
    ||dequant - original|| / ||original|| in float64 (Linear layout).
    """

    name: str
    layer: int | None
    module_type: str
    rel_error: float
    max_abs: float
    quant: str  # nf4 | fp4 | int8
    shape: tuple
    stack: str | None = None


_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def parse_layer(name: str) -> tuple[str | None, int | None]:
    """(stack, index) from the first numeric name component: 'model.layers.3.mlp' -> ('model.layers', 3)."""
    m = _INDEX.search(name)
    if not m:
        return None, None
    return name[: m.start()] or None, int(m.group(1))


def module_type_of(name: str) -> str:
    """Last non-numeric component of a module name (strip a trailing .weight/.bias for tensors)."""
    parts = [p for p in name.split(".") if p and not p.isdigit()]
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1] if parts else name


def quality_by_layer(original_state_dict, quantized_model) -> list[LayerQuality]:
    """Per bitsandbytes-quantized module of `quantized_model`: the error of bnb's dequantization of
    the packed weight against the original float weight `{module}.weight`.

    `original_state_dict` is a mapping in the float checkpoint's stored layout (Conv1D weights
    (in, out); they are transposed when the quantized module's `source_cls` is Conv1D), or a float
    model (its `dequantized_state_dict`, already Linear layout). Raises ValueError when an original
    weight is missing or its shape does not fit."""
    if is_model(original_state_dict):
        original: Mapping = DequantView(original_state_dict, None, dequantize=True)
        native = False
    else:
        original, native = original_state_dict, True
    conv1d = conv1d_cls()
    rows: list[LayerQuality] = []
    missing: list[str] = []
    for mname, mod in quantized_model.named_modules():
        if quant_kind(mod) is None:
            continue
        key = f"{mname}.weight"
        if key not in original:
            missing.append(key)
            continue
        ref = original[key]
        deq = dequantize_module_weight(mod).detach()
        src = getattr(mod, "source_cls", None)
        if (
            native
            and isinstance(src, type)
            and issubclass(src, conv1d)
            and ref.dim() == 2
            and tuple(ref.shape) == (deq.shape[1], deq.shape[0])
        ):
            ref = ref.t()
        if tuple(ref.shape) != tuple(deq.shape):
            raise ValueError(
                f"{key}: original shape {tuple(ref.shape)} does not fit the quantized weight's {tuple(deq.shape)}"
            )
        max_abs, rel = value_stats(deq, ref)
        stack, layer = parse_layer(mname)
        rows.append(
            LayerQuality(
                name=mname,
                layer=layer,
                module_type=module_type_of(mname),
                rel_error=rel,
                max_abs=max_abs,
                quant=quant_label(mod),
                shape=tuple(deq.shape),
                stack=stack,
            )
        )
    if missing:
        raise ValueError(f"original weights missing for {len(missing)} quantized modules: {abbreviate_names(missing)}")
    return rows


__all__ = ["LayerQuality", "parse_layer", "module_type_of", "quality_by_layer"]
