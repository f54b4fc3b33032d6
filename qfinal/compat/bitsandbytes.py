"""Every bitsandbytes internal qfinal relies on, in one place.

bitsandbytes has no public API to undo its CPU-kernel weight repacking or to keep a forward from
doing it; qfinal needs both so that measuring a model never modifies it. Keeping the private names
here means a bitsandbytes upgrade breaks one module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


def loaded_bitsandbytes():
    """bitsandbytes, only if something already imported it: a module cannot be a bnb layer
    otherwise, and importing it for a plain model is slow (its torch.compile'd ops)."""
    return sys.modules.get("bitsandbytes")


def undo_cpu_packing(module) -> None:
    """Bring a Linear4bit whose weight bnb repacked for its AVX512-BF16 CPU kernel back to the
    standard packed format, in place, with bnb's own inverse -- exactly what bnb's
    `_save_to_state_dict` (so `model.state_dict()` and `save_pretrained`) does. `dequantize_4bit` is
    only defined on the standard format."""
    w = module.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)


@contextmanager
def cpu_repack_disabled(model) -> Iterator[None]:
    """Forward passes inside this block leave bitsandbytes 4-bit weights as they are.

    bitsandbytes >= 0.48 repacks a Linear4bit's weight on its first eval forward on a CPU with
    AVX512-BF16, rounding absmax to bfloat16 (and dropping double quantization); the next
    `state_dict()` converts back and re-quantizes, so a forward would change what `save` persists and
    the logits of later forwards. qfinal measures, so it must not modify: this turns the repacking off
    (bnb then dequantizes and matmuls in the standard format) and restores the flags afterwards.
    Weights already repacked before the block stay repacked."""
    bnb = loaded_bitsandbytes()
    saved = []
    if bnb is not None:
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit) and getattr(mod, "support_avx512bf16_for_cpu", False):
                saved.append(mod)
                mod.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for mod in saved:
            mod.support_avx512bf16_for_cpu = True


def unpack_quant_state(blob) -> dict:
    """The dict packed into a stored `quant_state.bitsandbytes__nf4|fp4` tensor (shape, quant_type,
    dtype, blocksize, ...), read with bnb's own `unpack_tensor_to_dict` helper."""
    from bitsandbytes.utils import unpack_tensor_to_dict

    return unpack_tensor_to_dict(blob)


def four_bit_quantize_tables(quant_type: str):
    """(midpoints, order) that bitsandbytes' CPU `quantize_4bit` buckets against: the fp32 midpoints
    of the sorted code table, and the sort order mapping a bucket back to a code (fp4's table is
    not sorted). bitsandbytes' own cached pair where it has one, else computed the same way."""
    import torch

    try:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
    except ImportError:
        from bitsandbytes.functional import get_4bit_type

        code = get_4bit_type(quant_type, device=torch.device("cpu"))
        order = torch.argsort(code)
        return (code[order[:-1]] + code[order[1:]]) / 2, order
    return _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))


_ORIGINALS: dict = {}  # bitsandbytes' own functions by name, saved before the first patch


def original_functional(name: str):
    """bitsandbytes' own `functional.<name>`, even while `functional_replaced(name, ...)` is active."""
    if name in _ORIGINALS:
        return _ORIGINALS[name]
    from bitsandbytes import functional

    return getattr(functional, name)


@contextmanager
def functional_replaced(name: str, replacement) -> Iterator[None]:
    """`bitsandbytes.functional.<name>` is `replacement` inside this block, restored after.

    bnb's `Params4bit._quantize` and `Int8Params._quantize` (which transformers' quantize-on-load
    goes through) look `quantize_4bit` / `int8_vectorwise_quant` up on the module at every call, so
    this reaches them; nothing outside the block sees it. Not re-entrant across threads: qfinal's
    load runs the loader on one thread."""
    from bitsandbytes import functional

    _ORIGINALS.setdefault(name, getattr(functional, name))
    previous = getattr(functional, name)
    setattr(functional, name, replacement)
    try:
        yield
    finally:
        setattr(functional, name, previous)


__all__ = [
    "loaded_bitsandbytes",
    "undo_cpu_packing",
    "cpu_repack_disabled",
    "unpack_quant_state",
    "four_bit_quantize_tables",
    "functional_replaced",
    "original_functional",
]
