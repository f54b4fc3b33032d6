"""GPTQ checkpoints (quant_method "gptq", as GPTQModel / AutoGPTQ / optimum write them).

A quantized Linear of in_features K and out_features N stores `qweight` int32 [ceil(K·bits/32), N]
(codes packed low-first along the input dimension), `qzeros` int32 [G, ceil(N·bits/32)] (zero
points packed along the output dimension), `scales` [G, N] in fp16/bf16 and `g_idx` int32 [K], each
input column's group (a permutation's groups with act-order, `desc_act`); G = ceil(K/group_size).
The value of element (n, k) is scales[g, n] · (code[k, n] − zero[g, n]) with g = g_idx[k].

Format v1 ("gptq", `checkpoint_format` or `format`) stores each zero point minus one; GPTQModel
reads it by adding 0x11111111 (4-bit; 0x01010101 8-bit, 0x55555555 2-bit) to the whole int32 word
before unpacking, so a stored −1 (a true zero point of 0) borrows from the next field. Decoding
nibble by nibble and adding one to each is wrong exactly there. v2 ("gptq_v2") stores them as is.
Here the arithmetic is GPTQModel's torch kernel's: integer codes minus zeros, times the half scale.
"""

from __future__ import annotations

import math

from qfinal.errors import CheckpointError
from qfinal.formats.base import Read, StoredWeight
from qfinal.formats.int_packing import (
    HALF_DTYPES,
    IntScheme,
    PackedIntFormat,
    config_int,
    group_count,
    group_size_error,
    shape_problem,
    unpack_int32,
)

BITS = (2, 4, 8)  # one int32 word holds whole codes; 3-bit and the planar 5–7-bit layouts are refused
V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # +1 in every field of an int32 word
FORMATS = ("gptq", "gptq_v2")


def _format_of(qc: dict) -> str:
    """v1 "gptq" or "gptq_v2": transformers' GPTQConfig lets the legacy checkpoint_format win."""
    return str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()


def _config_errors(qc: dict) -> list[str]:
    errors = []
    _, why = config_int(qc, "bits", BITS)
    if why:
        errors.append(why + ("; 3-bit and 5–7-bit GPTQ pack codes across words" if "not one" in why else ""))
    why = group_size_error(qc.get("group_size", 128))
    if why:
        errors.append(why)
    for flag in ("sym", "desc_act"):
        if not isinstance(qc.get(flag, False), bool):
            errors.append(f"{flag} must be true or false, not {qc.get(flag)!r}")
    if _format_of(qc) not in FORMATS:
        errors.append(f"checkpoint format {_format_of(qc)!r} is not one qfinal reads (gptq / gptq_v2)")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        errors.append(f"pack_dtype {qc.get('pack_dtype')!r} is not one qfinal reads (int32)")
    return errors


def decode_zeros(qzeros, bits: int, v1: bool, out_features: int):
    """Integer zero points [G, N] of packed `qzeros`; v1 adds the offset to the whole word first."""
    import torch

    if v1:
        qzeros = qzeros + torch.tensor(V1_OFFSET[bits], dtype=torch.int32)  # wraps like GPTQModel's +=
    return unpack_int32(qzeros, bits, dim=1)[:, :out_features]


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, group_size: int, v1: bool, in_features: int):
    """[N, K] in the scales' dtype: scales[g_idx] · (codes − zeros[g_idx]), GPTQModel's torch path."""
    import torch

    codes = unpack_int32(qweight, bits, dim=0)[:in_features]
    zeros = decode_zeros(qzeros, bits, v1, scales.shape[1])
    if g_idx is None:
        groups = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
    else:
        groups = g_idx.long()
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= scales.shape[0]):
        raise ValueError(f"g_idx holds groups outside 0..{scales.shape[0] - 1}")
    return (scales[groups] * (codes - zeros[groups])).t().contiguous()


class Gptq(PackedIntFormat):
    name = "gptq"

    def dequantizes_on_load(self, raw_config: dict) -> str | None:
        """Always: transformers loads GPTQ only through optimum and gptqmodel (not qfinal's
        dependencies; gptqmodel's own requirements pull a CUDA torch), into packed kernel modules."""
        return "transformers' gptq loader needs optimum and gptqmodel and keeps the weights packed"

    def config_errors(self, qc: dict) -> list[str]:
        return _config_errors(qc)

    def read_scheme(self, qc: dict) -> IntScheme:
        return IntScheme(
            "gptq",
            bits=qc["bits"],
            group_size=qc.get("group_size", 128),
            sym=qc.get("sym", True),
            desc_act=qc.get("desc_act", False),
            zero_offset=_format_of(qc) == "gptq",
        )

    def module_problem(self, parts: dict, headers: dict, scheme: IntScheme) -> tuple[str | None, list[int]]:
        """qweight/qzeros/scales/g_idx of one module against the scheme; its [out, in] shape."""
        missing = [r for r in ("qzeros", "scales") if r not in parts]
        if "g_idx" not in parts and scheme.desc_act:
            missing.append("g_idx")
        if missing:
            return f"qweight lacks its {' and '.join(missing)}", []
        (qw_dtype, qw), (qz_dtype, qz), (sc_dtype, sc) = (headers[parts[r]] for r in ("qweight", "qzeros", "scales"))
        for role, dtype, want in (("qweight", qw_dtype, ("I32",)), ("qzeros", qz_dtype, ("I32",))):
            if dtype not in want:
                return f"{role} is stored as {dtype}, not I32", []
        if sc_dtype not in HALF_DTYPES:
            return f"scales is stored as {sc_dtype}, not F16 or BF16", []
        if len(qw) != 2 or len(sc) != 2:
            return f"qweight {list(qw)} and scales {list(sc)} must be two-dimensional", []
        out_features = qw[1]
        in_features = qw[0] * 32 // scheme.bits
        if "g_idx" in parts:
            gi_dtype, gi = headers[parts["g_idx"]]
            if gi_dtype != "I32" or len(gi) != 1:
                return f"g_idx is {gi_dtype} {list(gi)}, not a one-dimensional I32", []
            in_features = gi[0]
        groups = group_count(in_features, scheme.group_size)
        rows = math.ceil(in_features * scheme.bits / 32)
        why = (
            shape_problem("qweight", qw, [rows, out_features], f"{in_features} inputs")
            or shape_problem("scales", sc, [groups, out_features], f"group_size {scheme.group_size}")
            or shape_problem(
                "qzeros",
                qz,
                [groups, math.ceil(out_features * scheme.bits / 32)],
                f"{out_features} outputs at {scheme.bits} bits",
            )
        )
        return why, [out_features, in_features]

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        """[out, in] in the scales' dtype (the caller casts)."""
        scheme, parts = weight.scheme, weight.parts
        try:
            return dequantize_gptq(
                read(parts["qweight"]),
                read(parts["qzeros"]),
                read(parts["scales"]),
                read(parts["g_idx"]) if "g_idx" in parts else None,
                scheme.bits,
                scheme.group_size,
                scheme.zero_offset,
                weight.shape[1],
            )
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot dequantize gptq weight ({err})", where=f"{where}: {weight.name}") from None


GPTQ = Gptq()
