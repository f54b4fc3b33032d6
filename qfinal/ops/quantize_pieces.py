"""Large tensors of `qfinal quantize`, read, cast and quantized a slab of rows at a time.

Every operation on the way is exact slab by slab: the cast is element-wise; 4-bit blocks are
independent along the flattened tensor, so slabs whose element counts are multiples of the
blocksize (hence even: whole bytes of packed nibbles) give the same packed bytes and the same
absmax, concatenated, as the whole tensor (only the last slab may end in a partial block, as the
whole tensor does); int8 is row-wise. Double quantization works on the whole absmax (1/blocksize
of the data), built once every slab is done. Peak memory is then one slab, not one tensor. A
tensor read whole is one slab: every tensor goes through the same arithmetic.
"""

from __future__ import annotations

import math

from qfinal.checkpoint.dtypes import element_size
from qfinal.checkpoint.row_slabs import CHUNK_ENV, read_row_slabs, rows_per_slab, slab_bounds
from qfinal.ops.quantize_plan import BLOCKSIZE, QuantOptions, TensorJob, itemsize

__all__ = ["CHUNK_ENV", "computed", "computed_in_slabs", "row_step", "whole_absmax"]


def row_step(job: TensorJob, header) -> int | None:
    """Rows per slab, or None when the tensor is read whole (small, 1-D, or transposed for Conv1D)."""
    st_dtype, shape = header
    if job.transpose or len(shape) < 2:
        return None
    widest = max(element_size(st_dtype), itemsize(job.cast), 4)  # fp32 temporaries count
    cols = math.prod(shape[1:])
    unit = BLOCKSIZE // math.gcd(cols, BLOCKSIZE) if job.kind == "4bit" and cols else 1  # whole 4-bit blocks
    return rows_per_slab(shape, widest, unit)


def slabs(src, job: TensorJob, step: int | None):
    """The tensor `job.key` as consecutive slabs of `step` rows, each cast as the loader casts it
    (`tensor.to(dtype=...)`); `step` None: the whole tensor, transposed for Conv1D, as one slab."""
    import torch

    from qfinal.checkpoint.dtypes import torch_dtype_of

    dtype = getattr(torch, job.cast)
    if step is None:
        tensor = src.get(job.key).to(dtype=dtype)
        yield tensor.T if job.transpose else tensor
        return
    st_dtype, shape = src.headers[job.key]
    bounds = slab_bounds(shape[0], step)
    for _first, slab in read_row_slabs(str(src.files[job.key]), job.key, torch_dtype_of(st_dtype), shape, bounds):
        yield slab.to(dtype=dtype)


def four_bit_slabs(src, job: TensorJob, options: QuantOptions, step: int | None, absmax: list):
    """(byte offset, packed bytes) of each slab, quantized without double quantization; each slab's
    absmax is appended to `absmax`."""
    import torch

    from qfinal.formats.bnb_kernel import quantize_4bit

    at = 0
    for slab in slabs(src, job, step):
        packed, state = quantize_4bit(
            slab.contiguous(),  # Params4bit._quantize: `self.data.contiguous()`
            blocksize=BLOCKSIZE,
            quant_type=options.method,
            quant_storage=torch.uint8,
        )
        del slab
        absmax.append(state.absmax)
        yield at, packed
        at += packed.numel()


def whole_absmax(src, job: TensorJob, options: QuantOptions, step: int | None):
    """The fp32 block absmax of the whole weight, slab by slab (double quant's nested offset)."""
    import torch

    parts: list = []
    for _at, _packed in four_bit_slabs(src, job, options, step, parts):
        pass
    return torch.cat(parts)


def computed(job: TensorJob, src, options: QuantOptions):
    """(name, byte offset or None, tensor) for each output of `job`, as the quantized model's
    state_dict holds them: a large tensor a slab at a time (`row_step`), else as one slab."""
    return computed_in_slabs(job, src, options, row_step(job, src.headers[job.key]))


def computed_in_slabs(job: TensorJob, src, options: QuantOptions, step: int | None):
    """(name, byte offset or None, tensor) for each output of `job`: the main output in pieces at
    their offsets, the small ones (quant state, int8 row scales) whole (None) after them."""
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
        shape = src.headers[job.key][1]
        shape = torch.Size(shape[::-1] if job.transpose else shape)
        state = four_bit_state(absmax, shape, getattr(torch, job.cast), BLOCKSIZE, options.method, options.double_quant)
        for name, value in state.as_dict(packed=True).items():
            yield f"{job.key}.{name}", None, value
    else:  # Int8Params._quantize: fp16, then bnb's row-wise int8_vectorwise_quant, per slab
        from qfinal.formats.bnb_int8 import int8_rowwise

        module = job.key.rpartition(".")[0]
        scales, at = [], 0
        for slab in slabs(src, job, step):
            CB, SCB = int8_rowwise(slab.contiguous().to(dtype=torch.float16))
            del slab
            scales.append(SCB)
            yield job.key, at, CB
            at += CB.numel()
        yield f"{module}.SCB", None, torch.cat(scales)
        yield f"{module}.weight_format", None, torch.tensor(0, dtype=torch.uint8)
