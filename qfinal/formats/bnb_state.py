"""bitsandbytes quant state: what config.json, the safetensors headers and the 4-bit blob must say
before any bitsandbytes kernel runs.

bitsandbytes' kernels index the packed data, absmax and the code tables by the blob's shape and
blocksize without a check, so a short tensor there is an out-of-bounds read (garbage, or a crash):
every size is checked here first, from the headers (`validate --fast`) and from the blob.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from qfinal.formats.base import listing

QUANT_4BIT_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)
QUANT_8BIT_SUFFIXES = (".SCB", ".weight_format")
QUANT_STATE_SUFFIXES = QUANT_4BIT_SUFFIXES + QUANT_8BIT_SUFFIXES
BLOB_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
PARTS_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def state_base(key: str) -> tuple[str, str] | None:
    """('x.weight', '.absmax') for 'x.weight.absmax'; 8-bit state hangs off the module: ('x.weight', '.SCB')."""
    for suffix in QUANT_4BIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    for suffix in QUANT_8BIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight", suffix
    return None


def config_problems(qc: dict, tensors, states: dict) -> list[tuple[str | None, str]]:
    """Disagreements between quantization_config and the kinds of quant state stored."""
    wants_4bit, wants_8bit = bool(qc.get("load_in_4bit")), bool(qc.get("load_in_8bit"))
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    double = bool(qc.get("bnb_4bit_use_double_quant"))
    has_4bit = any(s in QUANT_4BIT_SUFFIXES for _, s in states.values())
    has_8bit = any(s == ".SCB" for _, s in states.values())
    problems: list[tuple[str | None, str]] = []
    where = "config.json:quantization_config"
    if not wants_4bit and not wants_8bit:
        problems.append((where, "quantization_config sets neither load_in_4bit nor load_in_8bit"))
    if wants_4bit and not has_4bit:
        problems.append((where, "quantization_config says 4-bit but no absmax/quant_state tensors are present"))
    if wants_8bit and not has_8bit:
        problems.append((where, "quantization_config says 8-bit but no SCB tensors are present"))
    if wants_4bit and has_8bit:
        problems.append((where, "quantization_config says 4-bit but SCB (8-bit) tensors are present"))
    if wants_8bit and has_4bit:
        problems.append((where, "quantization_config says 8-bit but 4-bit quant state is present"))
    if wants_4bit and has_4bit:
        other = "fp4" if kind == "nf4" else "nf4"
        wrong = sorted(k for k in tensors if k.endswith(f".quant_state.bitsandbytes__{other}"))
        if wrong:
            problems.append(
                (
                    where,
                    f"quantization_config says {kind} but {len(wrong)} tensor(s) hold {other} "
                    f"quant state: {listing(wrong, 3)}",
                )
            )
        nested = sorted(k for k in tensors if k.endswith((".nested_absmax", ".nested_quant_map")))
        if double and not nested:
            problems.append(
                (where, "quantization_config says bnb_4bit_use_double_quant but no nested_absmax tensors are present")
            )
        if nested and not double:
            problems.append(
                (
                    where,
                    "nested_absmax tensors are present but quantization_config does not set bnb_4bit_use_double_quant",
                )
            )
    return problems


def module_problems(
    qc: dict, tensors, states: dict, quantized_modules: Iterable[str], key_of: Callable[[str], str | None]
) -> list[tuple[str | None, str]]:
    """Each converted module holds its weight and complete state; no state is left without one."""
    wants_4bit, wants_8bit = bool(qc.get("load_in_4bit")), bool(qc.get("load_in_8bit"))
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    if wants_4bit:
        need = [".absmax", ".quant_map", f".quant_state.bitsandbytes__{kind}"]
        if qc.get("bnb_4bit_use_double_quant"):
            need += [".nested_absmax", ".nested_quant_map"]
    else:
        need = [".SCB"]
    problems: list[tuple[str | None, str]] = []
    weights = {f"{m}.weight": m for m in set(quantized_modules)}
    for weight, module in sorted(weights.items()):
        ckpt = key_of(weight)
        if ckpt is None:
            continue  # reported by missing_keys
        base = ckpt[: -len(".weight")]
        lacking = [
            n for n in ([ckpt + s for s in need] if wants_4bit else [base + s for s in need]) if n not in tensors
        ]
        if lacking:
            problems.append((weight, f"quantized module {module} lacks its quant state: {listing(lacking, 5)}"))
        elif wants_8bit and tensors[ckpt].dtype != "I8":
            problems.append((weight, f"8-bit weight stored as {tensors[ckpt].dtype}, not I8"))
        elif wants_8bit and (len(tensors[ckpt].shape) != 2 or tensors[base + ".SCB"].shape != tensors[ckpt].shape[:1]):
            problems.append((weight, f"8-bit weight {list(tensors[ckpt].shape)} and its SCB do not match"))
        elif wants_4bit and (problem := stored_4bit_problem(tensors, ckpt, kind, ".nested_absmax" in need)):
            problems.append((weight, f"quantized module {module}: {problem}"))
    ckpt_weights = {key_of(w) for w in weights} - {None}
    stray = sorted(k for k, (b, _) in states.items() if b not in ckpt_weights)
    if stray:
        problems.append(
            (
                stray[0],
                f"{len(stray)} quant-state tensor(s) belong to no quantized module "
                f"(skipped modules or renamed keys): {listing(stray, 5)}",
            )
        )
    return problems


def stored_4bit_problem(tensors, ckpt: str, kind: str, double: bool) -> str | None:
    """From the headers alone: the dtypes bitsandbytes writes, a 16-entry code table, and an absmax
    count that some blocksize explains for the packed size (the blob, tensor data, says which)."""
    blob = f"{ckpt}.quant_state.bitsandbytes__{kind}"
    expected = {ckpt + ".absmax": "U8" if double else "F32", ckpt + ".quant_map": "F32", blob: "U8"}
    wrong = [f"{k.rsplit('.', 1)[-1]} is {tensors[k].dtype}" for k, dt in expected.items() if tensors[k].dtype != dt]
    if wrong:
        return ", ".join(wrong) + " (bitsandbytes writes " + "/".join(expected.values()) + ")"
    if math.prod(tensors[ckpt + ".quant_map"].shape) != 16:
        return f"quant_map has {math.prod(tensors[ckpt + '.quant_map'].shape)} entries, not 16"
    blocks, most = math.prod(tensors[ckpt + ".absmax"].shape), 2 * tensors[ckpt].nbytes  # values packed
    if not any((blocks - 1) * bs < most and blocks * bs >= max(most - 7, 1) for bs in BLOCKSIZES):
        return f"{blocks} absmax value(s) cannot cover {most} packed 4-bit values"
    return None


# --------------------------------------------------------------------------- stored weights


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb's dequantize_4bit / dequantize_blockwise
STORAGE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}  # bnb_4bit_quant_storage


def four_bit_problem(blob: dict, headers: dict, parts: dict[str, str]) -> str | None:
    """What keeps bitsandbytes from dequantizing this weight, or None. Its kernels index the packed
    data, absmax and the code tables by the blob's shape and blocksize without a check: a short
    tensor there is an out-of-bounds read (garbage, or a crash), so each size is checked here."""
    shape, blocksize = blob.get("shape"), blob.get("blocksize")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if type(blocksize) is not int or blocksize not in BLOCKSIZES:
        return f"blocksize {blocksize!r} is not one of {BLOCKSIZES}"
    if blob.get("dtype") not in ("float16", "bfloat16", "float32"):
        return f"dtype {blob.get('dtype')!r} is not float16, bfloat16 or float32"
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    packed_state = next(role for role in parts if role.startswith("quant_state."))
    if headers[parts[packed_state]][0] != "U8":
        return f"{packed_state} is {headers[parts[packed_state]][0]}, not U8"
    storage = STORAGE_BYTES.get(headers[parts["weight"]][0])
    if storage is None:
        return f"packed weight is {headers[parts['weight']][0]}, not a bnb_4bit_quant_storage dtype"
    need = {"weight": (tuple(STORAGE_BYTES), -(-n // (2 * storage))), "quant_map": (("F32",), 16)}
    if "nested_absmax" in parts:
        nested = blob.get("nested_blocksize")
        if type(nested) is not int or nested not in BLOCKSIZES or blob.get("nested_dtype") != "float32":
            return f"nested_blocksize {nested!r} / nested_dtype {blob.get('nested_dtype')!r} are not bnb's"
        if not isinstance(blob.get("nested_offset"), (int, float)) or "nested_quant_map" not in parts:
            return "double quantization without nested_offset or nested_quant_map"
        need.update(
            absmax=(("U8",), blocks),
            nested_absmax=(("F32",), -(-blocks // nested)),
            nested_quant_map=(("F32",), 256),
        )
    else:
        need["absmax"] = (("F32",), blocks)
    for role, (dtypes, numel) in need.items():
        dtype, dims = headers[parts[role]]
        if dtype not in dtypes or math.prod(dims) != numel:
            return f"{role} is {dtype} {list(dims)}, expected {'/'.join(dtypes)} with {numel} element(s)"
    return None
