"""The safetensors dtype codes: the one table the header reader, the writers, the checks and the
NaN scan share.

torch is imported only inside the functions that return torch dtypes, so the modules that need
no tensor (the header reader, `validate --fast`, `qfinal --help`) never load it.
"""

from __future__ import annotations

from typing import NamedTuple

from qfinal.errors import ConfigError

OUTPUT_DTYPES = ("float16", "bfloat16", "float32")  # what dequantize and merge write floating tensors in


def check_output_dtype(name: str | None, where: str = "--dtype") -> None:
    """Refuse an output dtype qfinal does not write, in one line, before torch is imported."""
    if name is not None and name not in OUTPUT_DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}", where=where, hint="use float16, bfloat16 or float32")


class Code(NamedTuple):
    """What one safetensors dtype code is."""

    bits: int  # per element; F4 and F6_* are sub-byte, packed
    torch: str | None  # torch dtype name, where one element on disk is one torch element
    floating: bool  # torch's `is_floating_point` for the same values


# Every code safetensors 0.8 accepts, in its `Dtype` enum's declaration order (the enum's derived
# `Ord`): save_file lays tensors out by dtype, largest first, then by name (checked against
# save_file for every dtype torch can give it, tests/test_dequantize.py). F4 has a torch dtype
# (float4_e2m1fn_x2) but one torch element packs two F4 elements, so it has no name here.
CODES: dict[str, Code] = {
    "BOOL": Code(8, "bool", False),
    "F4": Code(4, None, True),
    "F6_E2M3": Code(6, None, True),
    "F6_E3M2": Code(6, None, True),
    "U8": Code(8, "uint8", False),
    "I8": Code(8, "int8", False),
    "F8_E5M2": Code(8, "float8_e5m2", True),
    "F8_E4M3": Code(8, "float8_e4m3fn", True),
    "F8_E8M0": Code(8, "float8_e8m0fnu", True),
    "F8_E4M3FNUZ": Code(8, "float8_e4m3fnuz", True),
    "F8_E5M2FNUZ": Code(8, "float8_e5m2fnuz", True),
    "I16": Code(16, "int16", False),
    "U16": Code(16, "uint16", False),
    "F16": Code(16, "float16", True),
    "BF16": Code(16, "bfloat16", True),
    "I32": Code(32, "int32", False),
    "U32": Code(32, "uint32", False),
    "F32": Code(32, "float32", True),
    "C64": Code(64, "complex64", False),
    "F64": Code(64, "float64", True),
    "I64": Code(64, "int64", False),
    "U64": Code(64, "uint64", False),
}
RANK = {code: i for i, code in enumerate(CODES)}
TORCH_TO_CODE = {c.torch: code for code, c in CODES.items() if c.torch is not None}

# The float codes a model's dtype (config.json `dtype` / `torch_dtype`) can be, by torch name: the
# dtype_consistency check counts these. The other float codes hold quantized data or its scales.
MODEL_FLOATS = {code: CODES[code].torch for code in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")}

# The IEEE codes whose NaN and Inf the prescan finds on the bits: (numpy signed, numpy unsigned,
# +Inf bit pattern, -Inf bit pattern), little-endian as safetensors stores them. A value is NaN or
# Inf exactly when, as a signed integer, it is at least +Inf or, as an unsigned one, at least -Inf.
NAN_SCAN = {
    "F16": ("<i2", "<u2", 0x7C00, 0xFC00),
    "BF16": ("<i2", "<u2", 0x7F80, 0xFF80),
    "F32": ("<i4", "<u4", 0x7F800000, 0xFF800000),
    "F64": ("<i8", "<u8", 0x7FF0000000000000, 0xFFF0000000000000),
}


def element_size(code: str) -> int:
    """Bytes per element of a whole-byte code ("BF16" -> 2)."""
    return CODES[code].bits // 8


def torch_name(code: str) -> str:
    """`str()` of the torch dtype of `code` ("BF16" -> "torch.bfloat16"), without importing torch."""
    name = CODES[code].torch
    if name is None:
        raise ValueError(f"safetensors dtype {code} has no torch dtype")
    return f"torch.{name}"


def torch_dtype_of(code: str):
    """The torch dtype of a safetensors dtype name ("BF16" -> torch.bfloat16); ValueError if none."""
    import torch

    c = CODES.get(code)
    if c is None or c.torch is None:
        raise ValueError(f"safetensors dtype {code} has no torch dtype")
    return getattr(torch, c.torch)


def safetensors_dtype(dtype) -> str:
    """The safetensors name of a torch dtype ("F16" for torch.float16); ValueError if unsupported."""
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_TO_CODE:
        raise ValueError(f"dtype {name} cannot be written by the streaming safetensors writer")
    return TORCH_TO_CODE[name]
