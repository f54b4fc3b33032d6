"""A multi-core CPU nf4 / fp4 quantizer, byte-identical to `bitsandbytes.functional.quantize_4bit`.

bitsandbytes quantizes on the CPU with its "default" torch kernel: fp32 arithmetic, one absmax per
block (NaN propagates), `clamp(A * (1 / absmax.clamp(min=1e-38)), -1, 1)` for the full blocks and
`A / absmax.clamp(min=1e-38)` for a last partial block, `bucketize` against the fp32 midpoints of
the code table (a tie goes to the lower code, NaN to the last), the bucket mapped through the
table's sort order (fp4), first element in the high nibble, an odd count padded with a zero. That
is several full passes over fp32 copies on one thread. Here the same IEEE operations, in the same
order, run block by block on every core (numba, `prange` over blocks); the clamp is left out
because it never changes a bucket (every midpoint lies inside (-1, 1), NaN stays NaN).

Double quantization (the absmax quantized again, blocksize 256, after subtracting its mean) is
1/blocksize of the data: it is done by bitsandbytes' own `quantize_blockwise`, as bitsandbytes does,
so the nested state is its own by construction.

`quantize_4bit` has bitsandbytes' signature and returns its (packed, QuantState). Without numba,
or with `QFINAL_KERNEL=bitsandbytes`, it is bitsandbytes' function itself. numba compiles the
kernel once per machine (cache=True: next to this file, else numba's user-wide cache folder, else
not cached at all -- never an error).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

KERNEL_ENV = "QFINAL_KERNEL"  # "bitsandbytes" forces bitsandbytes' own function
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts on the CPU
_ABSMAX_FLOOR = np.float32(1e-38)  # `absmax.clamp(min=1e-38)`, the scalar rounded to fp32 as torch does
_KIND = {"float32": 0, "bfloat16": 1, "float16": 2}

_lock = threading.Lock()
_compiled: dict[str, object] = {}


# --------------------------------------------------------------------------- the kernel (numba)


def _fill_block(src, start, count, kind, buf_bits, buf):
    """Block `src[start:start+count]` as fp32 into `buf` (`buf_bits` is the same memory as uint32),
    converted exactly as torch's `.float()` does (fp16 NaNs quieted, as the hardware conversion does)."""
    if kind == 0:
        for i in range(count):
            buf[i] = src[start + i]
    elif kind == 1:
        for i in range(count):
            buf_bits[i] = np.uint32(src[start + i]) << np.uint32(16)
    else:
        for i in range(count):
            h = np.uint32(src[start + i])
            sign = (h & np.uint32(0x8000)) << np.uint32(16)
            exp = (h >> np.uint32(10)) & np.uint32(0x1F)
            mant = h & np.uint32(0x3FF)
            if exp == 0:
                value = np.float32(mant) * np.float32(5.9604644775390625e-08)  # mant * 2**-24, exact
                buf[i] = -value if sign else value
            elif exp == 31:
                quiet = np.uint32(0x400000) if mant else np.uint32(0)
                buf_bits[i] = sign | np.uint32(0x7F800000) | (mant << np.uint32(13)) | quiet
            else:
                buf_bits[i] = sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))


def _block_absmax(buf, count):
    """max |x| over the block; NaN (the first one, sign cleared) when the block holds one."""
    m = np.float32(0.0)
    has_nan = False
    for i in range(count):
        a = abs(buf[i])
        m = a if a > m else m
        has_nan |= a != a
    if has_nan:
        for i in range(count):
            if buf[i] != buf[i]:
                return abs(buf[i])
    return m


def _block_codes(buf, count, scale, divide, bounds, order, codes):
    """The 4-bit code of each element: the bucket of x*scale (x/scale when `divide`) among `bounds`.
    Two passes, so that LLVM vectorizes the first (15 compares per element, no table look-up): the
    bucket (16 for NaN), then the code through the table's order."""
    if divide:
        for i in range(count):
            s = buf[i] / scale
            k = np.uint8(0)
            for b in range(15):
                k += np.uint8(s > bounds[b])
            codes[i] = k if s == s else np.uint8(16)
    else:
        for i in range(count):
            s = buf[i] * scale
            k = np.uint8(0)
            for b in range(15):
                k += np.uint8(s > bounds[b])
            codes[i] = k if s == s else np.uint8(16)
    for i in range(count):
        k = codes[i]
        codes[i] = order[15] if k == 16 else order[k]


def _quantize_blocks(src, n, blocksize, kind, bounds, order, packed, absmax):
    """Quantize the `n // blocksize` full blocks of `src` into `packed` / `absmax`, in parallel."""
    full = n // blocksize
    half = blocksize // 2
    for blk in numba_prange(full):
        bits = np.empty(blocksize, np.uint32)
        buf = bits.view(np.float32)
        codes = np.empty(blocksize, np.uint8)
        start = blk * blocksize
        _fill_block(src, start, blocksize, kind, bits, buf)
        m = _block_absmax(buf, blocksize)
        absmax[blk] = m
        floor = m if m >= _ABSMAX_FLOOR or m != m else _ABSMAX_FLOOR
        scale = np.float32(1.0) / floor
        _block_codes(buf, blocksize, scale, False, bounds, order, codes)
        base = blk * half
        for j in range(half):
            packed[base + j] = (codes[2 * j] << np.uint8(4)) | codes[2 * j + 1]


def _quantize_tail(src, n, blocksize, kind, bounds, order, packed, absmax):
    """The last, partial block (if any), divided by its absmax, which the caller has put in
    `absmax[-1]` already: bitsandbytes takes it from torch's whole-tensor `max()`, whose NaN is
    whatever torch's vectorized reduction makes of it on this CPU (so it comes from torch here too)."""
    full = n // blocksize
    count = n - full * blocksize
    if count == 0:
        return
    bits = np.empty(count + 1, np.uint32)
    buf = bits.view(np.float32)
    codes = np.empty(count + 1, np.uint8)
    _fill_block(src, full * blocksize, count, kind, bits, buf)
    _block_codes(buf, count, absmax[full], True, bounds, order, codes)
    if count % 2:
        codes[count] = order[7]  # the zero padding: bucketize(0.0) is bucket 7 for both tables
        count += 1
    base = full * (blocksize // 2)
    for j in range(count // 2):
        packed[base + j] = (codes[2 * j] << np.uint8(4)) | codes[2 * j + 1]


def numba_prange(n):  # replaced by numba.prange when compiled; plain range for the Python reference
    return range(n)


def _compile():
    """The jitted functions (None when numba is unavailable); compiled once per process. The first
    compile also writes numba's on-disk cache; should that fail (no writable cache folder), the
    kernel is compiled again without it: a slower start, never an error."""
    with _lock:
        if "blocks" not in _compiled:
            kernels = None
            try:
                import numba
            except Exception:  # not installed, or broken against this numpy: bitsandbytes then
                numba = None
            for cache in (True, False) if numba is not None else ():
                try:
                    kernels = _jit_all(numba, cache)
                    _warm_up(*kernels)
                    break
                except Exception:
                    kernels = None
            _compiled["blocks"], _compiled["tail"] = kernels or (None, None)
        return _compiled["blocks"], _compiled["tail"]


def _jit_all(numba, cache: bool):
    helpers = {fn.__name__: numba.njit(cache=cache)(fn) for fn in (_fill_block, _block_absmax, _block_codes)}
    globals().update(helpers)  # the kernels call the jitted helpers by their global names
    globals()["numba_prange"] = numba.prange
    blocks = numba.njit(cache=cache, parallel=True)(_quantize_blocks)
    tail = numba.njit(cache=cache)(_quantize_tail)
    return blocks, tail


def _warm_up(blocks, tail) -> None:
    """Compile (or load from the cache) both input kinds now, where a failure can still fall back."""
    bounds = np.linspace(-0.9, 0.9, 15).astype(np.float32)
    order = np.arange(16, dtype=np.uint8)
    for src, kind in ((np.ones(67, np.float32), 0), (np.ones(67, np.uint16), 1)):
        packed, absmax = np.empty(34, np.uint8), np.ones(2, np.float32)
        blocks(src, 67, 64, kind, bounds, order, packed, absmax)
        tail(src, 67, 64, kind, bounds, order, packed, absmax)


# --------------------------------------------------------------------------- the torch side


def kernel_name() -> str:
    """'numba' when `quantize_4bit` runs the kernel here, 'bitsandbytes' when it falls back."""
    if os.environ.get(KERNEL_ENV, "").strip().lower() == "bitsandbytes":
        return "bitsandbytes"
    blocks, _tail = _compile()
    return "numba" if blocks is not None else "bitsandbytes"


def _tables(quant_type: str):
    from qfinal.compat.bitsandbytes import four_bit_quantize_tables

    bounds, order = four_bit_quantize_tables(quant_type)
    return bounds.numpy().astype(np.float32), order.numpy().astype(np.uint8)


def quantize_4bit_raw(A, blocksize: int, quant_type: str, quant_storage):
    """(packed, absmax): `torch.ops.bitsandbytes.quantize_4bit` on the CPU, bit for bit."""
    import torch

    blocks, tail = _compile()
    if blocks is None:
        raise RuntimeError("numba is not available")
    dtype = str(A.dtype).removeprefix("torch.")
    flat = A.detach().reshape(-1).contiguous()
    if dtype == "float32":
        src = flat.numpy()
    else:
        src = flat.view(torch.int16).numpy().view(np.uint16)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    if n:
        bounds, order = _tables(quant_type)
        full = n // blocksize * blocksize
        if full < n:  # bnb: `A_flat[full:].abs().max().clamp(min=1e-38)`, through torch as there
            absmax[-1] = flat[full:].float().abs().max().clamp(min=1e-38)
        args = (src, n, blocksize, _KIND[dtype], bounds, order, packed.numpy(), absmax.numpy())
        blocks(*args)
        tail(*args)
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def four_bit_state(absmax, shape, dtype, blocksize: int, quant_type: str, compress_statistics: bool):
    """bitsandbytes' QuantState for a tensor of `shape` / `dtype` whose block absmax is `absmax` (fp32,
    CPU): with double quantization the absmax is quantized again as bitsandbytes does. Callers that
    quantize a tensor in pieces build the state of the whole from the concatenated absmax here."""
    from bitsandbytes import functional as F

    code = F.get_4bit_type(quant_type, device=absmax.device)
    if not compress_statistics:
        return F.QuantState(
            absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return F.QuantState(
        absmax=qabsmax,
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        code=code,
        quant_type=quant_type,
        offset=offset,
        state2=state2,
    )


def quantize_4bit(
    A,
    absmax=None,
    out=None,
    blocksize=None,
    compress_statistics=False,
    quant_type="fp4",
    quant_storage=None,
):
    """`bitsandbytes.functional.quantize_4bit`, same arguments, same result, faster on a CPU.

    Anything the kernel does not cover (a tensor not on the CPU, an unusual dtype or blocksize,
    numba missing, `QFINAL_KERNEL=bitsandbytes`) is bitsandbytes' own function."""
    import torch

    storage = torch.uint8 if quant_storage is None else quant_storage
    size = 64 if blocksize is None else blocksize
    if (
        A.device.type != "cpu"
        or str(A.dtype).removeprefix("torch.") not in _KIND
        or size not in BLOCKSIZES
        or quant_type not in ("nf4", "fp4")
        or kernel_name() != "numba"
    ):
        from qfinal.compat.bitsandbytes import original_functional

        quantize = original_functional("quantize_4bit")
        return quantize(A, absmax, out, blocksize, compress_statistics, quant_type, storage)
    _out, _absmax = quantize_4bit_raw(A, size, quant_type, storage)
    state = four_bit_state(_absmax, A.shape, A.dtype, size, quant_type, compress_statistics)
    del _absmax
    out = out.copy_(_out) if out is not None else _out
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return out, state


@contextmanager
def kernels_for_load() -> Iterator[str]:
    """Inside this block bitsandbytes' `quantize_4bit` and `int8_vectorwise_quant` (what
    transformers' quantize-on-load calls through `Params4bit` / `Int8Params`) are qfinal's
    (`formats.bnb_int8` for int8); yields the 4-bit kernel's name ('numba' or 'bitsandbytes')."""
    from qfinal.compat.bitsandbytes import functional_replaced
    from qfinal.formats.bnb_int8 import int8_vectorwise_quant

    name = kernel_name()
    with functional_replaced("int8_vectorwise_quant", int8_vectorwise_quant):
        if name != "numba":
            yield name
            return
        with functional_replaced("quantize_4bit", quantize_4bit):
            yield name


__all__ = [
    "BLOCKSIZES",
    "KERNEL_ENV",
    "kernels_for_load",
    "four_bit_state",
    "kernel_name",
    "quantize_4bit",
    "quantize_4bit_raw",
]
