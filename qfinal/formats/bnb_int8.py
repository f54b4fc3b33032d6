"""bitsandbytes' row-wise int8 quantization (LLM.int8(), no outliers), the same arithmetic in fp32.

On the CPU bitsandbytes runs `int8_vectorwise_quant` as torch ops on the fp16 input: the row
absmax `max(|A|)` in fp16, then `round(A * (127 / absmax)).to(int8)`, where the mixed-dtype
product promotes to fp32 element by element, slowly. Every fp16 value is exact in fp32, so the
same product on an fp32 copy made once gives the same values, and the same rounding and cast give
the same bytes. The absmax stays bitsandbytes' own fp16 reduction (an fp32 one canonicalizes NaN
payloads, which would change SCB's bytes). A 4096x4096 matrix: 56 ms instead of 107 ms; `qfinal
quantize --quantize int8` of the 1.1B: 8.6 s instead of 10.2 s. `tests/test_bnb_kernel.py` proves it equal
to bitsandbytes on adversarial rows (NaN, ±Inf, zero and -0.0 rows, subnormals, fp16 extremes,
exact .5 ties). `QFINAL_KERNEL=bitsandbytes` gives bitsandbytes' own function.
"""

from __future__ import annotations

import os

from qfinal.formats.bnb_kernel import KERNEL_ENV


def int8_rowwise(A):
    """(CB int8, SCB fp32 row absmax): `bitsandbytes.functional.int8_vectorwise_quant(A)` for a 2-D
    fp16 CPU tensor, bit for bit; anything else goes to bitsandbytes."""
    import torch

    if (
        A.dim() != 2
        or A.dtype != torch.float16
        or A.device.type != "cpu"
        or os.environ.get(KERNEL_ENV, "").strip().lower() == "bitsandbytes"
    ):
        from qfinal.compat.bitsandbytes import original_functional

        CB, SCB, _outliers = original_functional("int8_vectorwise_quant")(A)
        return CB, SCB
    absmax = torch.max(A.abs(), dim=1).values.float()  # as bitsandbytes: a NaN keeps its fp16 payload
    wide = A.float()
    wide.mul_((127.0 / absmax).unsqueeze(-1))
    wide.round_()
    return wide.to(torch.int8), absmax


def int8_vectorwise_quant(A, threshold=0.0):
    """`bitsandbytes.functional.int8_vectorwise_quant`'s signature, for quantize-on-load
    (`formats.bnb_kernel.kernels_for_load`): `int8_rowwise` where no outliers are held back."""
    if threshold:
        from qfinal.compat.bitsandbytes import original_functional

        return original_functional("int8_vectorwise_quant")(A, threshold)
    CB, SCB = int8_rowwise(A)
    return CB, SCB, None
