"""AWQ GEMM checkpoints (quant_method "awq", version "gemm", as AutoAWQ / GPTQModel write them).

A quantized Linear of in_features K and out_features N stores `qweight` int32 [K, N/8] (eight 4-bit
codes per word along the output dimension, interleaved: the word's nibbles hold columns 0, 2, 4, 6,
1, 3, 5, 7 of its eight), `qzeros` int32 [K/group_size, N/8] packed the same way (zero points as
they are: no v1-style offset) and `scales` [K/group_size, N] in fp16/bf16. The value of element
(n, k) is (code[k, n] − zero[g, n]) · scales[g, n] with g = k // group_size.

Only the 4-bit GEMM layout is read: GEMV / exllama / marlin layouts and GPTQModel's 2–8-bit AWQ
bit streams are refused. The arithmetic is AWQ's `dequantize_gemm` (GPTQModel's torch_awq backend).
"""

from __future__ import annotations

from qfinal.errors import CheckpointError
from qfinal.formats.base import Read, StoredWeight
from qfinal.formats.int_packing import (
    HALF_DTYPES,
    IntScheme,
    PackedIntFormat,
    config_int,
    shape_problem,
    unpack_int32,
)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the column each nibble of a packed word holds
PACK = 8  # 4-bit codes per int32 word


def _version_of(qc: dict) -> str:
    """ "gemm" / "gemv" / ...: transformers' AwqConfig lets the legacy `version` win over `format`."""
    return str(qc.get("version") or qc.get("format") or "gemm").lower()


def _config_errors(qc: dict) -> list[str]:
    errors = []
    _, why = config_int(qc, "bits", (4,), default=4)
    if why:
        errors.append(why + ("; only the 4-bit GEMM layout is read" if "not one" in why else ""))
    group = qc.get("group_size", 128)
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        errors.append(f"group_size must be a positive integer, not {group!r}")
    if not isinstance(qc.get("zero_point", True), bool):
        errors.append(f"zero_point must be true or false, not {qc.get('zero_point')!r}")
    if _version_of(qc) != "gemm":
        errors.append(f"AWQ version {_version_of(qc)!r} is not one qfinal reads (gemm)")
    return errors


def dequantize_awq(qweight, qzeros, scales, group_size: int):
    """[N, K] in the scales' dtype: (codes − zeros) · scales per group, AWQ's dequantize_gemm."""
    codes = unpack_int32(qweight, 4, dim=1, order=AWQ_ORDER)
    zeros = unpack_int32(qzeros, 4, dim=1, order=AWQ_ORDER)
    weight = (codes - zeros.repeat_interleave(group_size, dim=0)) * scales.repeat_interleave(group_size, dim=0)
    return weight.t().contiguous()


class Awq(PackedIntFormat):
    name = "awq"

    def dequantizes_on_load(self, raw_config: dict) -> str | None:
        """Always: transformers loads AWQ only through gptqmodel (not a qfinal dependency; its own
        requirements pull a CUDA torch), into packed kernel modules."""
        return "transformers' awq loader needs gptqmodel and keeps the weights packed"

    def config_errors(self, qc: dict) -> list[str]:
        return _config_errors(qc)

    def read_scheme(self, qc: dict) -> IntScheme:
        return IntScheme("awq", bits=4, group_size=qc.get("group_size", 128), sym=not qc.get("zero_point", True))

    def module_problem(self, parts: dict, headers: dict, scheme: IntScheme) -> tuple[str | None, list[int]]:
        """qweight/qzeros/scales of one module against the scheme (a g_idx is stray); its [out, in]."""
        missing = [r for r in ("qzeros", "scales") if r not in parts]
        if missing:
            return f"qweight lacks its {' and '.join(missing)}", []
        if "g_idx" in parts:
            return "AWQ stores no g_idx", []
        (qw_dtype, qw), (qz_dtype, qz), (sc_dtype, sc) = (headers[parts[r]] for r in ("qweight", "qzeros", "scales"))
        if qw_dtype != "I32" or qz_dtype != "I32":
            return f"qweight / qzeros are stored as {qw_dtype} / {qz_dtype}, not I32", []
        if sc_dtype not in HALF_DTYPES:
            return f"scales is stored as {sc_dtype}, not F16 or BF16", []
        if len(qw) != 2 or len(sc) != 2:
            return f"qweight {list(qw)} and scales {list(sc)} must be two-dimensional", []
        in_features, out_features = qw[0], qw[1] * PACK
        if in_features % scheme.group_size:
            return f"{in_features} input features do not divide into groups of {scheme.group_size}", []
        groups = in_features // scheme.group_size
        why = shape_problem(
            "scales", sc, [groups, out_features], f"qweight {list(qw)} with group_size {scheme.group_size}"
        ) or shape_problem("qzeros", qz, [groups, qw[1]], f"qweight {list(qw)} with group_size {scheme.group_size}")
        return why, [out_features, in_features]

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        """[out, in] in the scales' dtype (the caller casts)."""
        parts = weight.parts
        try:
            return dequantize_awq(
                read(parts["qweight"]), read(parts["qzeros"]), read(parts["scales"]), weight.scheme.group_size
            )
        except RuntimeError as err:
            raise CheckpointError(f"cannot dequantize awq weight ({err})", where=f"{where}: {weight.name}") from None


AWQ = Awq()
