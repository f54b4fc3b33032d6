"""Large tensors of `qfinal quantize`, read, cast and quantized a slab of rows at a time.

Every operation on the way is exact slab by slab: the cast is element-wise; 4-bit blocks are
independent along the flattened tensor, so slabs whose element counts are multiples of the
blocksize (hence even: whole bytes of packed nibbles) give the same packed bytes and the same
absmax, concatenated, as the whole tensor (only the last slab may end in a partial block, as the
whole tensor does); int8 is row-wise. Double quantization works on the whole absmax (1/blocksize
of the data), built once every slab is done. Peak memory is then one slab, not one tensor.
"""

from __future__ import annotations

import math
import os

from qfinal.checkpoint.dtypes import element_size
from qfinal.ops.quantize_plan import BLOCKSIZE, QuantOptions, TensorJob

CHUNK_ENV = "QFINAL_QUANTIZE_CHUNK_BYTES"  # read at each call: bytes of input (or cast copy) per slab
CHUNK_BYTES = 16 << 20
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def chunk_bytes() -> int:
    value = os.environ.get(CHUNK_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else CHUNK_BYTES


def row_step(job: TensorJob, header) -> int | None:
    """Rows per slab, or None when the tensor is read whole (small, 1-D, or transposed for Conv1D)."""
    st_dtype, shape = header
    if job.transpose or len(shape) < 2 or shape[0] <= 1:
        return None
    cols = math.prod(shape[1:])
    if cols == 0:
        return None
    itemsize = max(element_size(st_dtype), _ITEMSIZE.get(job.cast, 4), 4)  # fp32 temporaries count
    rows = max(1, chunk_bytes() // (cols * itemsize))
    if job.kind == "4bit":
        unit = BLOCKSIZE // math.gcd(cols, BLOCKSIZE)  # rows * cols a multiple of the blocksize
        rows = max(unit, rows // unit * unit)
    return rows if rows < shape[0] else None


def _data_start(path: str, key: str) -> int:
    """Where `key`'s bytes start in the safetensors file `path` (its header was validated on opening)."""
    import json
    import struct

    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return 8 + length + header[key]["data_offsets"][0]


def slabs(src, job: TensorJob, step: int):
    """The tensor `job.key` as consecutive slabs of `step` rows, each cast as the loader casts it.
    Read with pread, slab by slab (safetensors' `get_slice` reads the whole tensor first)."""
    import numpy as np
    import torch

    from qfinal.checkpoint.dtypes import torch_dtype_of

    st_dtype, shape = src.headers[job.key]
    dtype, stored = getattr(torch, job.cast), torch_dtype_of(st_dtype)
    row_bytes = math.prod(shape[1:]) * element_size(st_dtype)
    path = str(src.files[job.key])
    start = _data_start(path, job.key)
    fd = os.open(path, os.O_RDONLY)
    try:
        for first in range(0, shape[0], step):
            rows = min(step, shape[0] - first)
            buffer = np.empty(rows * row_bytes, np.uint8)
            view, done = memoryview(buffer), 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], start + first * row_bytes + done)
                if got <= 0:
                    raise OSError(f"{path}: unexpected end of file reading {job.key!r}")
                done += got
            slab = torch.from_numpy(buffer).view(stored).reshape(rows, *shape[1:])
            yield slab.to(dtype=dtype)
    finally:
        os.close(fd)


def four_bit_slabs(src, job: TensorJob, options: QuantOptions, step: int, absmax: list):
    """(byte offset, packed bytes) of each slab, quantized without double quantization; each slab's
    absmax is appended to `absmax`."""
    import torch

    from qfinal.formats.bnb_kernel import quantize_4bit

    at = 0
    for slab in slabs(src, job, step):
        packed, state = quantize_4bit(
            slab.contiguous(), blocksize=BLOCKSIZE, quant_type=options.method, quant_storage=torch.uint8
        )
        del slab
        absmax.append(state.absmax)
        yield at, packed
        at += packed.numel()


def whole_absmax(src, job: TensorJob, options: QuantOptions, step: int):
    """The fp32 block absmax of the whole weight, slab by slab (double quant's nested offset)."""
    import torch

    parts: list = []
    for _at, _packed in four_bit_slabs(src, job, options, step, parts):
        pass
    return torch.cat(parts)


def computed_in_slabs(job: TensorJob, src, options: QuantOptions, step: int):
    """(name, byte offset or None, tensor) for each output of `job`: the large output in pieces at
    their offsets, the small ones (quant state, int8 row scales) whole after them."""
    import torch

    if job.kind == "copy":
        at = 0
        for slab in slabs(src, job, step):
            yield job.key, at, slab
            at += slab.numel() * slab.element_size()
    elif job.kind == "4bit":
        from qfinal.formats.bnb_kernel import four_bit_state

        parts: list = []
        for at, packed in four_bit_slabs(src, job, options, step, parts):
            yield job.key, at, packed
        absmax = torch.cat(parts)
        del parts
        shape = torch.Size(src.headers[job.key][1])
        state = four_bit_state(absmax, shape, getattr(torch, job.cast), BLOCKSIZE, options.method, options.double_quant)
        for name, value in state.as_dict(packed=True).items():
            yield f"{job.key}.{name}", None, value
    else:  # Int8Params._quantize, row-wise: fp16, then bnb's int8_vectorwise_quant per slab
        from bitsandbytes.functional import int8_vectorwise_quant

        module = job.key.rpartition(".")[0]
        scales, at = [], 0
        for slab in slabs(src, job, step):
            CB, SCB, _outliers = int8_vectorwise_quant(slab.contiguous().to(dtype=torch.float16))
            del slab
            scales.append(SCB)
            yield job.key, at, CB
            at += CB.numel()
        yield f"{module}.SCB", None, torch.cat(scales)
        yield f"{module}.weight_format", None, torch.tensor(0, dtype=torch.uint8)
