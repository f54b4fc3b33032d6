"""Merging adapters into the base weights, quantized bases included.

Merged adapters are applied first, in order, each with `merge_and_unload()`; unmerged adapters are
loaded afterwards (LoRA deltas add, so the order does not change the function, only float
rounding). On a plain base this is exactly peft's result. On a bitsandbytes base:
- default: the whole base is dequantized first (transformers `model.dequantize()`, to the model's
  dtype), then peft merges in float: merged weight = dequant(W) + ΔW exactly; the model is no longer
  quantized. Its outputs differ from the fp32 reference (fp32 base + merged adapter) by the 4-bit
  quantization error of the base only.
- `requantize=True`: peft's bnb merge (dequantize, add ΔW, quantize again to the same 4-bit / int8
  format): the merged weights carry a second rounding, of W + ΔW.
bitsandbytes >= 0.48 on CPUs with AVX512-BF16 repacks 4-bit weights on the first forward pass, after
which `dequantize_4bit` (used by peft's merge and transformers' dequantize) returns wrong values; the
packing is undone here before any merge.
"""

from __future__ import annotations

from qfinal.adapters.prepare import Prepared
from qfinal.errors import ConfigError
from qfinal.report import Finding

MERGE = "adapter_merge"


def quantization(model) -> str | None:
    """'nf4' / 'fp4' / 'int8' for a bitsandbytes base, the quant method for another quantizer, else None."""
    from qfinal.formats import loaded_method

    method = loaded_method(model)
    if method is not None:
        return method
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None or getattr(model, "is_quantized", False):
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        return str(getattr(method, "value", method) or "quantized")
    return None


def ready_to_merge(state: dict, prep: Prepared, quant: str, requantize: bool, findings: list[Finding]) -> str | None:
    """Make the `quant` base in `state["model"]` ready for peft's merge: bnb's CPU packing undone and,
    unless `requantize`, the whole base dequantized once. Returns the quantization the merge meets."""
    model = state["model"]
    _unpack_bnb_cpu(model)
    if requantize or state["dequantized"]:
        return quant
    model = state["model"] = _dequantize(model, quant, prep)
    state["dequantized"] = True
    findings.append(
        Finding(
            check=MERGE,
            severity="info",
            key=prep.name,
            message=f"base dequantized from {quant} to {dtype_name(model)} to merge '{prep.name}' "
            f"(merged weight = dequant(W) + ΔW, exact in {dtype_name(model)}); the model is "
            "no longer quantized — set merge_requantize to quantize the merged weights again",
        )
    )
    return None


def merge(peft_model, prep: Prepared, quant: str | None) -> tuple[object, Finding]:
    """peft's `merge_and_unload` of the loaded adapter (into `quant` weights when set): the merged
    base, and the finding that says how. peft's refusal becomes a one-line ConfigError."""
    try:
        model = peft_model.merge_and_unload()
    except (ValueError, NotImplementedError, RuntimeError, AttributeError) as exc:  # peft cannot merge it
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"peft could not merge adapter '{prep.name}' ({prep.config['peft_type']}): {detail}",
            where=str(prep.spec.path),
            hint="load it unmerged" + (", or drop merge_requantize" if quant else ""),
        ) from None
    how = (
        f"into {quant} weights by peft (dequantize, add ΔW, quantize again: the merged weights carry a second rounding)"
        if quant
        else f"into {dtype_name(model)} weights (peft merge_and_unload)"
    )
    return model, Finding(check=MERGE, severity="info", key=prep.name, message=f"adapter '{prep.name}' merged {how}")


def dtype_name(model) -> str:
    """The dtype of the model's first float parameter ('float16'), for messages."""
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "float"


def _unpack_bnb_cpu(model) -> None:
    """Undo bitsandbytes' CPU weight packing (made on the first eval forward on AVX512-BF16 CPUs).

    Packed 4-bit weights dequantize wrongly through `dequantize_4bit`; bitsandbytes itself unpacks
    them before saving (`Linear4bit._save_to_state_dict`) and before moving to a GPU. This does the same.
    """
    from qfinal.compat.bitsandbytes import undo_cpu_packing

    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        try:
            undo_cpu_packing(module)
        except ImportError:  # a bitsandbytes without the inverse under its known name: the save path unpacks
            module.state_dict()  # Linear4bit._save_to_state_dict unpacks in place


def _dequantize(model, quant: str, prep: Prepared):
    try:
        result = model.dequantize()
    except (ValueError, NotImplementedError, AttributeError, RuntimeError) as exc:
        raise ConfigError(
            f"cannot dequantize the {quant} base to merge adapter '{prep.name}' ({exc})",
            where=str(prep.spec.path),
            hint="set merge_requantize to merge into the quantized weights, or load it unmerged",
        )
    result = result if result is not None else model
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):  # transformers leaves them set; IA3's merge reads them
        if getattr(result, attr, False):
            setattr(result, attr, False)
    return result
