"""bitsandbytes (nf4 / fp4 / int8): config.json, stored quant state, dequantization, transformers' quantizer.

A stored 4-bit weight is packed data plus `.absmax`, `.quant_map`, the
`.quant_state.bitsandbytes__nf4|fp4` blob (and `.nested_*` with double quantization); an int8
weight is int8 data plus `<module>.SCB` (and `.weight_format`). Dequantization takes the path of
transformers' `dequantize_and_replace`, so it equals `model.dequantize(dtype)` bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

from qfinal.errors import CheckpointError
from qfinal.formats.base import QuantFormat, Read, Scheme, StoredWeight, listing
from qfinal.report import Finding

QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")
QUANTIZABLE_CLASSES = ("Linear", "Conv1D")

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


def _state_base(key: str) -> tuple[str, str] | None:
    """('x.weight', '.absmax') for 'x.weight.absmax'; 8-bit state hangs off the module: ('x.weight', '.SCB')."""
    for suffix in QUANT_4BIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    for suffix in QUANT_8BIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight", suffix
    return None


# --------------------------------------------------------------------------- the arithmetic


def dequantize_4bit_weight(parts: dict):
    """What transformers' `dequantize_bnb_weight` returns for a Params4bit loaded from `parts`.

    `parts` holds "weight" (packed data) and the quant-state tensors, keyed by their name after the
    weight's own (absmax, quant_map, nested_*, quant_state.bitsandbytes__nf4|fp4) — the same dict
    `Bnb4bitDeserialize` hands to `Params4bit.from_prequantized`. Result dtype: the quant state's.
    """
    import bitsandbytes.functional as F
    import torch

    state = F.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"}, torch.device("cpu"))
    return F.dequantize_4bit(parts["weight"], state)


def dequantize_int8_weight(weight, scb):
    """What transformers' `dequantize_bnb_weight` returns for an Int8Params: float32."""
    import bitsandbytes.functional as F

    return F.int8_vectorwise_dequant(weight, scb)


# --------------------------------------------------------------------------- header checks


def _config_problems(qc: dict, tensors, states: dict) -> list[tuple[str | None, str]]:
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


def _module_problems(
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
        elif wants_4bit and (problem := _stored_4bit_problem(tensors, ckpt, kind, ".nested_absmax" in need)):
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


def _stored_4bit_problem(tensors, ckpt: str, kind: str, double: bool) -> str | None:
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
    if not any((blocks - 1) * bs < most and blocks * bs >= max(most - 7, 1) for bs in _BLOCKSIZES):
        return f"{blocks} absmax value(s) cannot cover {most} packed 4-bit values"
    return None


# --------------------------------------------------------------------------- stored weights


def _find_4bit(headers: dict, read: Read, where: str) -> list[StoredWeight]:
    """4-bit weights: one packed-state blob per weight names all its parts."""
    from qfinal.compat.bitsandbytes import unpack_quant_state

    found = []
    for key in sorted(headers):
        suffix = next((s for s in BLOB_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        base = key[: -len(suffix)]
        if base not in headers:
            raise CheckpointError(f"4-bit quant state {key!r} has no packed weight {base!r}", where=where)
        parts = {"weight": base, suffix[1:]: key}
        parts.update({part: f"{base}.{part}" for part in PARTS_4BIT if f"{base}.{part}" in headers})
        for needed in ("absmax", "quant_map"):
            if needed not in parts:
                raise CheckpointError(f"4-bit weight {base!r} lacks {needed!r}", where=where)
        try:
            blob = unpack_quant_state(read(key))
            shape = list(blob["shape"])
        except Exception as err:
            raise CheckpointError(f"unreadable 4-bit quant state ({err})", where=f"{where}: {key}") from None
        if blob.get("quant_type") not in ("nf4", "fp4"):
            raise CheckpointError(f"unknown quant_type {blob.get('quant_type')!r}", where=f"{where}: {key}")
        problem = _four_bit_problem(blob, headers, parts)
        if problem:
            raise CheckpointError(f"4-bit quant state does not fit its weight: {problem}", where=f"{where}: {key}")
        found.append(StoredWeight(base, "4bit", parts, shape))
    return found


_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb's dequantize_4bit / dequantize_blockwise
_STORAGE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}  # bnb_4bit_quant_storage


def _four_bit_problem(blob: dict, headers: dict, parts: dict[str, str]) -> str | None:
    """What keeps bitsandbytes from dequantizing this weight, or None. Its kernels index the packed
    data, absmax and the code tables by the blob's shape and blocksize without a check: a short
    tensor there is an out-of-bounds read (garbage, or a crash), so each size is checked here."""
    shape, blocksize = blob.get("shape"), blob.get("blocksize")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if type(blocksize) is not int or blocksize not in _BLOCKSIZES:
        return f"blocksize {blocksize!r} is not one of {_BLOCKSIZES}"
    if blob.get("dtype") not in ("float16", "bfloat16", "float32"):
        return f"dtype {blob.get('dtype')!r} is not float16, bfloat16 or float32"
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    packed_state = next(role for role in parts if role.startswith("quant_state."))
    if headers[parts[packed_state]][0] != "U8":
        return f"{packed_state} is {headers[parts[packed_state]][0]}, not U8"
    storage = _STORAGE_BYTES.get(headers[parts["weight"]][0])
    if storage is None:
        return f"packed weight is {headers[parts['weight']][0]}, not a bnb_4bit_quant_storage dtype"
    need = {"weight": (tuple(_STORAGE_BYTES), -(-n // (2 * storage))), "quant_map": (("F32",), 16)}
    if "nested_absmax" in parts:
        nested = blob.get("nested_blocksize")
        if type(nested) is not int or nested not in _BLOCKSIZES or blob.get("nested_dtype") != "float32":
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


def _find_int8(headers: dict, where: str) -> list[StoredWeight]:
    """int8 weights: <owner>.weight (int8) + <owner>.SCB (+ <owner>.weight_format)."""
    found = []
    for key in sorted(headers):
        if not key.endswith(".weight") or headers[key][0] != "I8":
            continue
        owner = key[: -len(".weight")]
        scb = next((k for k in (f"{owner}.SCB", f"{key}.SCB") if k in headers), None)
        if scb is None or headers[scb][0] != "F32":
            continue  # find_weights refuses the int8 weight left without its state
        shape = list(headers[key][1])
        if len(shape) != 2 or list(headers[scb][1]) != shape[:1]:
            raise CheckpointError(
                f"int8 weight {shape} and SCB {list(headers[scb][1])} do not match", where=f"{where}: {key}"
            )
        parts = {"weight": key, "SCB": scb}
        fmt = next((k for k in (f"{owner}.weight_format", f"{key}.weight_format") if k in headers), None)
        if fmt is not None:
            parts["weight_format"] = fmt
        found.append(StoredWeight(key, "int8", parts, list(headers[key][1])))
    return found


def _dequantize_int8(weight: StoredWeight, read: Read, where: str):
    if "weight_format" in weight.parts:
        fmt = read(weight.parts["weight_format"])
        if fmt.numel() != 1 or int(fmt.item()) != 0:
            raise CheckpointError(
                "int8 weight is not in 'row' format (only row is supported)", where=f"{where}: {weight.name}"
            )
    data, scb = read(weight.parts["weight"]), read(weight.parts["SCB"])
    if data.dim() != 2 or scb.shape != (data.shape[0],):
        raise CheckpointError(
            f"int8 weight {list(data.shape)} and SCB {list(scb.shape)} do not match", where=f"{where}: {weight.name}"
        )
    return dequantize_int8_weight(data, scb)


# --------------------------------------------------------------------------- the format


class BitsAndBytes(QuantFormat):
    name = "bitsandbytes"
    quantized_classes = QUANTIZED_CLASSES

    def detect(self, raw_config: dict) -> bool:
        qc = raw_config.get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"

    def scheme(self, raw_config: dict, where: str) -> Scheme:
        qc = raw_config["quantization_config"]
        eight = qc.get("load_in_8bit") or qc.get("_load_in_8bit")
        four = qc.get("load_in_4bit") or qc.get("_load_in_4bit")
        if eight and four:
            raise CheckpointError(
                "bitsandbytes quantization_config sets both load_in_4bit and load_in_8bit", where=where
            )
        if eight:
            return Scheme("int8")
        if four:
            qtype = qc.get("bnb_4bit_quant_type", "fp4")
            if qtype not in ("nf4", "fp4"):
                raise CheckpointError(f"unknown bnb_4bit_quant_type {qtype!r}", where=where)
            return Scheme(qtype, bool(qc.get("bnb_4bit_use_double_quant", False)))
        raise CheckpointError(
            "bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit", where=where
        )

    def is_quant_state_key(self, key: str) -> bool:
        return key.endswith(QUANT_STATE_SUFFIXES)

    def packed_weight_keys(self, tensors: Iterable[str]) -> set[str]:
        out = set()
        for key in tensors:
            base = _state_base(key)
            if base is not None and (base[1] in QUANT_4BIT_SUFFIXES or base[1] == ".SCB"):
                out.add(base[0])
        return out

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """Globally, the kind of state (4-bit vs 8-bit, nf4 vs fp4, double quant or not); per module,
        when `quantized_modules` is given, each converted module's complete state and no stray state."""
        tensors, qc = inventory.tensors, raw_config["quantization_config"]
        states = {k: b for k in tensors if (b := _state_base(k)) is not None}
        problems = _config_problems(qc, tensors, states)
        if quantized_modules is not None and not problems:
            problems = _module_problems(qc, tensors, states, quantized_modules, key_of)
        if problems:
            return [Finding(check="quantization_config", severity="error", key=k, message=m) for k, m in problems]
        double = "+double_quant" if qc.get("bnb_4bit_use_double_quant") else ""
        mode = "int8" if qc.get("load_in_8bit") else qc.get("bnb_4bit_quant_type", "fp4") + double
        checked = (
            f"; {len(set(quantized_modules))} quantized module(s) complete" if quantized_modules is not None else ""
        )
        return [
            Finding(
                check="quantization_config",
                severity="info",
                message=f"quant state matches quantization_config ({mode}){checked}",
            )
        ]

    def find_weights(self, headers: dict, read: Read, scheme: Scheme, where: str) -> list[StoredWeight]:
        by_name = {w.name: w for w in _find_4bit(headers, read, where)}
        by_name.update((w.name, w) for w in _find_int8(headers, where))
        found = list(by_name.values())
        consumed = {key for w in found for key in w.parts.values()}
        # left over: state that belongs to no weight, or packed / int8 data without its state; as
        # plain tensors they would be copied through and the "dequantized" checkpoint broken
        stray = sorted(
            k
            for k, (dtype, _) in headers.items()
            if k not in consumed and (self.is_quant_state_key(k) or (dtype in ("I8", "U8") and k.endswith(".weight")))
        )
        if stray:
            raise CheckpointError(
                f"{len(stray)} quantized tensor(s) without a complete quant state: {listing(stray, 3)}",
                where=where,
                hint="re-export the quantized checkpoint",
            )
        kinds = {w.kind for w in found}
        expected = "int8" if scheme.method == "int8" else "4bit"
        if not found:
            raise CheckpointError(
                f"config.json says bitsandbytes {scheme.method} but no quantized weights were found", where=where
            )
        if kinds != {expected}:
            raise CheckpointError(
                f"config.json says bitsandbytes {scheme.method} but the weights hold "
                f"{' and '.join(sorted(kinds))} data",
                where=where,
            )
        return found

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        if weight.kind == "int8":
            return _dequantize_int8(weight, read, where)
        parts = {role: read(key) for role, key in weight.parts.items()}
        try:
            return dequantize_4bit_weight(parts)
        except Exception as err:
            raise CheckpointError(f"cannot dequantize 4-bit weight ({err})", where=f"{where}: {weight.name}") from None

    def loaded_method(self, model) -> str | None:
        for param in model.parameters():
            kind = type(param).__name__
            if kind == "Params4bit":
                return getattr(getattr(param, "quant_state", None), "quant_type", None) or "4-bit"
            if kind == "Int8Params":
                return "int8"
        return None

    def state_tensors(self, model) -> Iterator[tuple[str, object]]:
        """absmax (and nested absmax) of 4-bit weights, SCB of int8 ones: not parameters or buffers."""
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            prefix = f"{module_name}.weight" if module_name else "weight"
            state = getattr(weight, "quant_state", None)
            if state is not None:
                yield f"{prefix}.absmax", getattr(state, "absmax", None)
                nested = getattr(state, "state2", None)
                if nested is not None:
                    yield f"{prefix}.nested_absmax", getattr(nested, "absmax", None)
            scb = getattr(weight, "SCB", None)
            if scb is not None:
                yield f"{module_name}.SCB", scb

    def holds_packed_data(self, tensor) -> bool:
        # packed 4-bit codes: with a float quant_storage their bytes read as NaNs, not values
        return bool(getattr(tensor, "bnb_quantized", False))

    def quantizer_config(self, q):
        """BitsAndBytesConfig for `quantize:`; None for `method: none`, so transformers sees exactly
        what a user would pass."""
        if q.method == "none":
            return None
        import torch
        from transformers import BitsAndBytesConfig

        kwargs: dict = {"llm_int8_skip_modules": q.skip_modules}
        if q.method == "int8":
            kwargs.update(load_in_8bit=True, llm_int8_threshold=q.int8_threshold)
        else:
            kwargs.update(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.method,
                bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
            )
            if q.compute_dtype:
                kwargs["bnb_4bit_compute_dtype"] = getattr(torch, q.compute_dtype)
        return BitsAndBytesConfig(**kwargs)

    def describe_method(self, hf_quantizer) -> str:
        if hf_quantizer is None:
            return "none"
        qc = hf_quantizer.quantization_config
        if getattr(qc, "load_in_8bit", False):
            return "int8"
        name = getattr(qc, "bnb_4bit_quant_type", "4bit")
        if getattr(qc, "bnb_4bit_use_double_quant", False):
            name += "+double_quant"
        return name

    def converted_and_skipped(self, model, original_classes: dict[str, str], hf_quantizer, user_skips):
        """Compare module classes before and after the quantizer's swap."""
        from qfinal.compat.transformers import keep_in_fp32_modules

        converted, skipped = [], []
        not_convert = set(getattr(hf_quantizer, "modules_to_not_convert", None) or [])
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        keep_fp32 = keep_in_fp32_modules(model, strict=False)
        for name, module in model.named_modules():
            before = original_classes.get(name)
            after = type(module).__name__
            if before is None:
                continue
            if after in QUANTIZED_CLASSES and before != after:
                converted.append({"module": name, "from": before, "to": after})
            elif before in QUANTIZABLE_CLASSES and after == before:
                skipped.append(
                    {"module": name, "reason": _skip_reason(name, module, output, not_convert, keep_fp32, user_skips)}
                )
        return converted, skipped


def _skip_reason(name, module, output, not_convert, keep_fp32, user_skips) -> str:
    last = name.split(".")[-1]
    if user_skips and any(s == name or s == last or name.startswith(s + ".") for s in user_skips):
        return "listed in skip_modules (llm_int8_skip_modules)"
    if output is not None and module is output:
        return "output head kept in full precision (transformers' default)"
    if any(k in name for k in keep_fp32):
        return "in the model's _keep_in_fp32_modules"
    if any(s == name or s == last or name.startswith(s + ".") for s in not_convert):
        return "in the quantizer's modules_to_not_convert"
    return "not converted by the quantizer"


BITSANDBYTES = BitsAndBytes()
