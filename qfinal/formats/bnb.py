"""bitsandbytes (nf4 / fp4 / int8): config.json, stored quant state, dequantization, transformers' quantizer.

A stored 4-bit weight is packed data plus `.absmax`, `.quant_map`, the
`.quant_state.bitsandbytes__nf4|fp4` blob (and `.nested_*` with double quantization); an int8
weight is int8 data plus `<module>.SCB` (and `.weight_format`). Dequantization takes the path of
transformers' `dequantize_and_replace`, so it equals `model.dequantize(dtype)` bit for bit.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from qfinal.errors import CheckpointError
from qfinal.formats.base import QuantFormat, Read, Scheme, StoredWeight, listing, matched_findings, problem_findings
from qfinal.formats.bnb_state import (
    BLOB_SUFFIXES,
    PARTS_4BIT,
    QUANT_4BIT_SUFFIXES,
    QUANT_STATE_SUFFIXES,
    config_problems,
    four_bit_problem,
    module_problems,
    state_base,
)
from qfinal.report import Finding

QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")
QUANTIZABLE_CLASSES = ("Linear", "Conv1D")

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
        problem = four_bit_problem(blob, headers, parts)
        if problem:
            raise CheckpointError(f"4-bit quant state does not fit its weight: {problem}", where=f"{where}: {key}")
        found.append(StoredWeight(base, "4bit", parts, shape))
    return found


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
            base = state_base(key)
            if base is not None and (base[1] in QUANT_4BIT_SUFFIXES or base[1] == ".SCB"):
                out.add(base[0])
        return out

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """Globally, the kind of state (4-bit vs 8-bit, nf4 vs fp4, double quant or not); per module,
        when `quantized_modules` is given, each converted module's complete state and no stray state."""
        tensors, qc = inventory.tensors, raw_config["quantization_config"]
        states = {k: b for k in tensors if (b := state_base(k)) is not None}
        problems = config_problems(qc, tensors, states)
        if quantized_modules is not None and not problems:
            problems = module_problems(qc, tensors, states, quantized_modules, key_of)
        if problems:
            return problem_findings(problems)
        double = "+double_quant" if qc.get("bnb_4bit_use_double_quant") else ""
        mode = "int8" if qc.get("load_in_8bit") else qc.get("bnb_4bit_quant_type", "fp4") + double
        checked = (
            f"; {len(set(quantized_modules))} quantized module(s) complete" if quantized_modules is not None else ""
        )
        return matched_findings(f"({mode}){checked}")

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
