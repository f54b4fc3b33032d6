"""A plain LoRA merged into its base weight a slab of rows at a time, with peft's own arithmetic.

peft's `lora.Linear.merge` builds the whole delta `(B @ A) * scaling` (in fp32 on the CPU when the
adapter is fp16/bf16, cast back) and adds it to the weight in place: for a 7B MLP weight that is
two fp32 temporaries of 180 MB, and the mixed-dtype in-place add is the slowest step of a merge.
Row i of the delta depends on row i of B only, so the same operations on a slab of rows of B,
added to the same rows of the weight, give the same rows (memory is one slab, not one module)
provided the matmul computes each row of a slab as it computes that row of the whole product.
The scaling, the cast and the add are element-wise, hence exact in any slab; the matmul is not
always: MKL's sgemm computes a trailing block of fewer rows than its kernel with other code, so
a slab of 3 rows, or a slab starting mid-block, can differ in the last bit from the whole
product (measured: 877 of 3,000 random shapes with arbitrary slabs). Slabs here therefore start
at multiples of `ROW_ALIGN` rows and the last one takes the remainder, as the whole product's
last block does: 0 differences in 4,500 random shapes (rows 1-12,000, ranks 1-256) at alignments
of 16 and 64 on this machine, 81 at 8. Since the kernel is the CPU's and the BLAS's, each slab
layout is also probed once per process on random data (`slabs_are_exact`): if this machine's
matmul does not give the whole product's rows, the module is merged whole by peft.
`tests/test_lora_rows.py` proves the row merge equal to peft's over shapes, ranks, scalings,
dtypes and slab sizes. Everything else (DoRA and the other variants, `lora_bias`,
`fan_in_fan_out`, layers other than nn.Linear) returns None here and goes through peft's code
(`adapters.deltas`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qfinal.checkpoint.row_slabs import rows_per_slab, slab_bounds

_HALF = (torch.float16, torch.bfloat16)
ROW_ALIGN = 128  # rows; 4-8x the alignment measured to be needed here
_PROBED: dict[tuple, bool] = {}


def merge_bounds(rows: int, in_features: int) -> list[tuple[int, int]]:
    """(start, end) rows of the slabs a weight of `rows` x `in_features` is merged in: fp32 deltas
    of about `chunk_bytes()`, starts aligned to ROW_ALIGN, the remainder in the last slab."""
    step = rows_per_slab([rows, in_features], 4, ROW_ALIGN)
    return slab_bounds(rows, step, absorb_tail=True)


def slabs_are_exact(bounds: list[tuple[int, int]], in_features: int, rank: int, dtype: torch.dtype) -> bool:
    """Whether this machine's matmul gives a first and a last slab shaped as in `bounds` the rows
    of the whole product (random data, once per layout and process)."""
    if len(bounds) == 1:
        return True
    step, last = bounds[0][1], bounds[-1][1] - bounds[-1][0]
    key = (step, last, in_features, rank, dtype)
    if key not in _PROBED:
        g = torch.Generator().manual_seed(len(_PROBED))
        up = torch.randn(step + last, rank, generator=g, dtype=dtype)
        down = torch.randn(rank, in_features, generator=g, dtype=dtype)
        whole = up @ down
        _PROBED[key] = all(torch.equal(up[a:b] @ down, whole[a:b]) for a, b in ((0, step), (step, step + last)))
    return _PROBED[key]


@dataclass
class RowDelta:
    """One adapter's delta, rows on demand: `add_to(first, slab, workspace)` is peft's
    `weight.data += delta` on rows `first : first + len(slab)`."""

    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scaling: float
    cast_back: torch.dtype | None  # peft computes a 16-bit adapter's delta in fp32 on the CPU

    def exact_in(self, bounds: list[tuple[int, int]]) -> bool:
        return slabs_are_exact(bounds, self.lora_A.shape[1], self.lora_A.shape[0], self.lora_A.dtype)

    def add_to(self, first: int, slab: torch.Tensor, workspace) -> None:
        """`workspace` (`checkpoint.row_slabs.Workspace`): the temporaries go in its buffers."""
        up = self.lora_B[first : first + slab.shape[0]]
        delta = workspace.take("delta", self.lora_A.dtype, [up.shape[0], self.lora_A.shape[1]])
        torch.matmul(up, self.lora_A, out=delta)
        delta.mul_(self.scaling)
        if self.cast_back is not None:
            delta = workspace.take("delta_cast", self.cast_back, delta.shape).copy_(delta)
        common = torch.promote_types(slab.dtype, delta.dtype)
        if common == slab.dtype:
            slab += delta
            return
        # `slab += delta` for a 16-bit slab computes in fp32 and rounds once, as this does, but
        # through a fresh fp32 temporary per call: 10x slower, and page faults once allocations
        # of its size are mmapped (`checkpoint.heap`)
        wide = workspace.take("wide", common, slab.shape).copy_(slab)
        wide += delta
        slab.copy_(wide)


def row_delta(unit, adapter: str, weight_shape) -> RowDelta | None:
    """The row-wise delta of `adapter` in `unit`, when peft's merge of it is exactly
    `weight += (B @ A) * scaling` on an nn.Linear weight of `weight_shape`; else None."""
    from peft.tuners.lora.layer import Linear

    if type(unit) is not Linear or adapter not in unit.lora_A or adapter not in unit.active_adapters:
        return None
    if adapter in unit.merged_adapters:
        return None
    if unit.fan_in_fan_out or adapter in getattr(unit, "lora_variant", {}):
        return None
    if getattr(unit, "use_dora", {}).get(adapter):  # peft before its variants
        return None
    if getattr(unit, "lora_bias", {}).get(adapter) or type(unit.get_base_layer()) is not torch.nn.Linear:
        return None
    down, up, scaling = unit.lora_A[adapter], unit.lora_B[adapter], unit.scaling.get(adapter)
    if type(down) is not torch.nn.Linear or type(up) is not torch.nn.Linear or type(scaling) not in (int, float):
        return None
    weight_A, weight_B = down.weight.detach(), up.weight.detach()
    on = {weight_A.device.type, weight_B.device.type}  # meta: read from the file when merged (`lazy_adapter`)
    if not on <= {"cpu", "meta"} or weight_B.dtype != weight_A.dtype:
        return None
    if len(weight_shape) != 2 or list(weight_shape) != [weight_B.shape[0], weight_A.shape[1]]:
        return None
    cast_back = weight_B.dtype if weight_B.dtype in _HALF else None
    if cast_back is not None:
        weight_A, weight_B = weight_A.float(), weight_B.float()
    return RowDelta(weight_A, weight_B, scaling, cast_back)
