"""What a model holds, as the engine compares it: raw (`raw_state_dict`, what `save_pretrained`
persists) or dequantized into Linear layout (`dequantized_state_dict`), one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from qfinal.compat.bitsandbytes import loaded_bitsandbytes, undo_cpu_packing
from qfinal.formats import holds_packed_data


def conv1d_cls():
    """transformers' GPT-2 style `Conv1D`, imported only when a model is looked at."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def quant_kind(module) -> str | None:
    """'4bit', '8bit' or None for a bitsandbytes linear holding quantized data."""
    bnb = loaded_bitsandbytes()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit" if getattr(module.weight, "quant_state", None) is not None else None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit" if module.weight.dtype == torch.int8 else None
    return None


def quant_label(module) -> str:
    """'nf4' | 'fp4' | 'int8' for a quantized bnb linear, 'none' otherwise."""
    kind = quant_kind(module)
    if kind == "8bit":
        return "int8"
    if kind == "4bit":
        return str(getattr(module.weight.quant_state, "quant_type", "4bit"))
    return "none"


def _int8_scb(module) -> torch.Tensor:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError("Linear8bitLt module has int8 weights but no SCB statistics")
    return scb


def dequantize_module_weight(module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a quantized linear's weight, (out, in), in the dtype bnb
    returns (the original dtype for 4-bit, float32 for int8). Non-quantized weights come back as-is.
    A 4-bit weight in bnb's CPU-kernel layout is first converted back in place (see
    `undo_cpu_packing`)."""
    bnb = loaded_bitsandbytes()
    kind = quant_kind(module)
    w = module.weight
    if kind == "4bit":
        undo_cpu_packing(module)
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if kind == "8bit":
        return bnb.functional.int8_vectorwise_dequant(w.data, _int8_scb(module))
    return w.data


def _remove_tied(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Drop tied aliases exactly as `save_pretrained` does (same transformers function). Tensors of
    packed codes are never aliases and are kept out of its storage-pointer search: a torchao
    tensor subclass has no storage to point at."""
    if not hasattr(model, "config"):
        return sd
    from qfinal.compat.transformers import remove_tied_weights

    packed = {k for k, v in sd.items() if holds_packed_data(v)}
    kept = remove_tied_weights({k: v for k, v in sd.items() if k not in packed}, model)
    return {k: v for k, v in sd.items() if k in kept or k in packed}


def raw_state_dict(model) -> dict[str, torch.Tensor]:
    """What `save_pretrained` would persist, by model-side name: `model.state_dict()` (bitsandbytes'
    hooks add packed weights, absmax, quant_map, nested_absmax/nested_quant_map, the
    `quant_state.bitsandbytes__*` blob, SCB and weight_format), minus tied aliases. Names are the
    model's own, before transformers' save-time key renaming (`revert_weight_conversion`), which is a
    no-op for most architectures."""
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return _remove_tied(sd, model)


def _flatten_packed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor subclass of packed codes (torchao) as the components `save_pretrained` writes
    for it, `{module}._{param}_{component}`: compared raw, a weight is what is persisted."""
    out = {}
    for key, value in sd.items():
        if not (holds_packed_data(value) and hasattr(value, "__tensor_flatten__")):
            out[key] = value
            continue
        module, _, param = key.rpartition(".")
        prefix = f"{module}._{param}_" if module else f"_{param}_"
        for attr in value.__tensor_flatten__()[0]:
            if (part := getattr(value, attr, None)) is not None:
                out[prefix + attr] = part
    return out


def _module_index(model) -> dict[str, Any]:
    return dict(model.named_modules())


def _bnb_aux(name: str, key: str) -> bool:
    """Is `key` an auxiliary bitsandbytes entry of module `name` (not its weight/bias)?"""
    if not key.startswith(name + "."):
        return False
    rest = key[len(name) + 1 :]
    return rest not in ("weight", "bias")


class Layout:
    """Per weight name: 'linear' | 'conv1d' | 'packed' for weights of linear-like modules."""

    def __init__(self):
        self.kind: dict[str, str] = {}
        self.conv1d_source: set[str] = set()  # Conv1D now, or bnb linears replacing a Conv1D


class DequantView(Mapping):
    """Lazily dequantized, layout-aligned values of a model; one tensor materialized at a time."""

    def __init__(self, model, dtype: torch.dtype | None, dequantize: bool):
        self.model = model
        self.dtype = dtype
        self.dequantize = dequantize
        self.layout = Layout()
        raw = raw_state_dict(model) if dequantize else _flatten_packed(raw_state_dict(model))
        modules = _module_index(model)
        conv1d = conv1d_cls()
        self._special: dict[str, Any] = {}  # weight key -> module needing dequant/transpose
        drop: set[str] = set()
        for mname, mod in modules.items():
            wkey = f"{mname}.weight" if mname else "weight"
            src = getattr(mod, "source_cls", None)
            is_conv = isinstance(mod, conv1d)
            if is_conv or (isinstance(src, type) and issubclass(src, conv1d)):
                self.layout.conv1d_source.add(wkey)
            kind = quant_kind(mod)
            if kind is not None:
                if dequantize:
                    self._special[wkey] = mod
                    drop |= {k for k in raw if _bnb_aux(mname, k)}
                    self.layout.kind[wkey] = "linear"
                else:
                    self.layout.kind[wkey] = "packed" if kind == "4bit" else "linear"
            elif is_conv:
                if dequantize:
                    self._special[wkey] = mod
                    self.layout.kind[wkey] = "linear"
                else:
                    self.layout.kind[wkey] = "conv1d"
            elif isinstance(mod, torch.nn.Linear):
                self.layout.kind[wkey] = "linear"
        self._raw = raw
        self._keys = [k for k in raw if k not in drop]
        self._keyset = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        if not self.dequantize:
            return self._raw[key]
        mod = self._special.get(key)
        if mod is None:
            t = self._raw[key]
            if holds_packed_data(t) and callable(getattr(t, "dequantize", None)):
                t = t.dequantize().detach()  # a torchao weight: its own dequantization
        elif quant_kind(mod) is not None:
            t = dequantize_module_weight(mod).detach()
        else:  # Conv1D: (in, out) -> Linear layout (out, in)
            t = self._raw[key].t()
        if self.dtype is not None and t.dtype.is_floating_point:
            t = t.to(self.dtype)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def dequantized_state_dict(model, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Float values per persisted parameter/buffer name: bnb `Linear4bit` weights through
    `bitsandbytes.functional.dequantize_4bit`, `Linear8bitLt` through `int8_vectorwise_dequant`
    (CB * SCB / 127), both in Linear layout (out, in); `Conv1D` weights transposed to Linear layout
    (out, in); bnb auxiliary keys dropped; floating tensors cast to `dtype` (None keeps each dtype),
    others as-is."""
    view = DequantView(model, dtype, dequantize=True)
    return {k: view[k] for k in view}


def is_model(x) -> bool:
    """A model (compared through its views) rather than a plain mapping of tensors."""
    return isinstance(x, torch.nn.Module)


__all__ = [
    "conv1d_cls",
    "quant_kind",
    "quant_label",
    "dequantize_module_weight",
    "raw_state_dict",
    "Layout",
    "DequantView",
    "dequantized_state_dict",
    "is_model",
]
