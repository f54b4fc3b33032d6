"""The quantization formats qfinal reads, one module each, and the one place that says which
format a checkpoint or a loaded model is in.

A new format is a `QuantFormat` subclass in its own module plus one entry in `_BUILT_IN`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from qfinal.formats.awq import AWQ
from qfinal.formats.base import QuantFormat
from qfinal.formats.bnb import BITSANDBYTES
from qfinal.formats.compressed_tensors import COMPRESSED_TENSORS
from qfinal.formats.fp8 import FP8
from qfinal.formats.gptq import GPTQ
from qfinal.formats.refused import HQQ
from qfinal.formats.torchao import TORCHAO

_BUILT_IN: list[QuantFormat] = [BITSANDBYTES, FP8, COMPRESSED_TENSORS, GPTQ, AWQ, TORCHAO, HQQ]
FORMATS: dict[str, QuantFormat] = {f.name: f for f in _BUILT_IN}  # quant_method -> format


def format_for(raw_config: dict) -> QuantFormat | None:
    """The format config.json's quantization_config declares; None when it declares none qfinal reads."""
    return next((f for f in FORMATS.values() if f.detect(raw_config)), None)


def supported_methods() -> str:
    """The quant_method values qfinal reads, for messages ("bitsandbytes / fp8 / ...")."""
    return " / ".join(name for name, f in FORMATS.items() if f.readable)


def quantizer_format(raw_config: dict, pre_quantized: bool) -> QuantFormat:
    """The format of the quantizer transformers runs: the checkpoint's for a pre-quantized one,
    bitsandbytes when qfinal quantizes on load (the only method it quantizes with)."""
    fmt = format_for(raw_config) if pre_quantized else None
    return fmt if fmt is not None and fmt.readable else BITSANDBYTES


def is_quant_state_key(key: str) -> bool:
    """True for a stored tensor that some format keeps beside a weight as its quant state."""
    return any(f.is_quant_state_key(key) for f in FORMATS.values())


def packed_weight_keys(tensors: Iterable[str]) -> set[str]:
    """Stored keys of quantized weights, in any format (their dtype is the storage's)."""
    tensors = list(tensors)
    return set().union(*(f.packed_weight_keys(tensors) for f in FORMATS.values()))


def loaded_method(model) -> str | None:
    """'nf4' / 'fp4' / 'int8' ... for a model holding some format's quantized parameters, else None."""
    return next((m for f in FORMATS.values() if (m := f.loaded_method(model)) is not None), None)


def state_tensors(model) -> Iterator[tuple[str, object]]:
    """(name, tensor) for the quant state a loaded model holds outside its parameters and buffers."""
    for f in FORMATS.values():
        yield from f.state_tensors(model)


def held_bytes(tensor) -> int:
    """Bytes a loaded tensor really holds: its format's count for a tensor subclass keeping
    components of its own, else numel x element size."""
    counted = (b for f in FORMATS.values() if (b := f.held_bytes(tensor)) is not None)
    return next(counted, tensor.numel() * tensor.element_size())


def planned_sizes(inventory) -> dict[str, int]:
    """Bytes each parameter will hold once loaded where some format loads it as stored components
    (read from the headers once); parameters absent from it are counted from the skeleton."""
    sizes: dict[str, int] = {}
    if inventory is None:
        return sizes
    for f in reversed(list(FORMATS.values())):  # the first format that counts a parameter wins
        sizes.update(f.planned_sizes(inventory) or {})
    return sizes


def holds_packed_data(tensor) -> bool:
    """True for a tensor of packed codes, whose bytes are not values."""
    return any(f.holds_packed_data(tensor) for f in FORMATS.values())
