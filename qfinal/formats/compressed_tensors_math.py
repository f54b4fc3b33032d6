"""compressed-tensors' arithmetic in plain torch: unpacking `weight_packed` and dequantizing.

Written from compressed-tensors 0.20's `pack_to_int32` / `unpack_from_int32` (dense packing:
element i of a row sits at bits [i*b, (i+1)*b) of the row's int32 words, stored with an offset
of 2^(b-1)) and `dequantize` (`(q.to(s.dtype) - zp.to(s.dtype)) * s`, in the scale's dtype). The
scale of each element is looked up by strategy (tensor, channel, group with optional `g_idx`,
block with partial last blocks); every step is element-wise, so the result is the library's bit
for bit whatever the broadcasting. Nothing here imports compressed_tensors.
"""

from __future__ import annotations

import math
import sys


def packed_width(count: int, bits: int) -> int:
    """int32 words that hold `count` densely packed `bits`-bit values."""
    return math.ceil(count * bits / 32)


def unpack_int32(packed, bits: int, count: int, packed_dim: int = 1):
    """The int8 values of a 2-D int32 tensor densely packed along `packed_dim` (`count` of them)."""
    import torch

    if packed_dim == 0:
        return unpack_int32(packed.t(), bits, count, 1).t()
    rows = packed.shape[0]
    if bits in (4, 8) and sys.byteorder == "little":
        raw = packed.contiguous().reshape(-1).view(torch.uint8).reshape(rows, -1)
        if bits == 4:  # codes 0..15 (as int8 too), minus the offset: no wrap-around
            return torch.stack((raw & 0xF, raw >> 4), dim=-1).view(torch.int8).reshape(rows, -1)[:, :count] - 8
        return (raw[:, :count] ^ 0x80).view(torch.int8)  # x - 128 for x in 0..255
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))  # a value may straddle into the next word
    start = torch.arange(count, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    low = words[:, word] >> offset
    high = words[:, word + 1] << (32 - offset)
    values = (low | high) & ((1 << bits) - 1)
    return (values - (1 << (bits - 1))).to(torch.int8)


def expand_groups(param, cols: int, group_size: int, g_idx=None):
    """A [rows, groups] scale or zero point as [rows, cols]: group g covers columns g*size ...,
    or the columns `g_idx` assigns to it (activation order)."""
    if g_idx is not None:
        return param[:, g_idx.long()]
    return param.repeat_interleave(group_size, dim=-1)[:, :cols]


def expand_blocks(param, rows: int, cols: int, block: tuple[int, int]):
    """A [..., ceil(rows/bh), ceil(cols/bw)] block grid as [..., rows, cols] (last blocks may be
    partial; leading dims, as of stacked expert weights, kept)."""
    param = param.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return param.repeat_interleave(block[1], dim=-1)[..., :cols]


def per_element(param, shape: list[int], strategy: str, group_size: int | None, block, g_idx=None):
    """A scale or zero point broadcastable against a weight of `shape`, by strategy."""
    rows, cols = shape
    if strategy == "group":
        return expand_groups(param, cols, group_size, g_idx)
    if strategy == "block":
        return expand_blocks(param, rows, cols, block)
    if strategy == "channel":
        return param.reshape(rows, 1)
    return param.reshape(1, 1) if param.numel() == 1 else param  # tensor


def dequantize_values(values, scale, zero_point, shape: list[int], strategy: str, group_size, block, g_idx=None):
    """compressed-tensors' `dequantize`: `(q - zp) * scale` in the scale's dtype, element-wise."""
    rows, cols = shape
    if strategy == "group" and g_idx is None and cols % group_size == 0:  # broadcast, as the library does
        result = values.unflatten(-1, (cols // group_size, group_size)).to(scale.dtype)
        if zero_point is not None:
            result = result - zero_point.unsqueeze(-1).to(scale.dtype)
        return (result * scale.unsqueeze(-1)).flatten(-2)
    scale = per_element(scale, shape, strategy, group_size, block, g_idx)
    result = values.to(scale.dtype)
    if zero_point is not None:
        result = result - per_element(zero_point, shape, strategy, group_size, block, g_idx).to(scale.dtype)
    return result * scale
