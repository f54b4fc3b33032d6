"""bitsandbytes options -> transformers' BitsAndBytesConfig, and what the quantizer did to the model."""

from __future__ import annotations

from qfinal.config import QuantizeConfig

QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")
QUANTIZABLE_CLASSES = ("Linear", "Conv1D")


def bnb_config_for(q: QuantizeConfig):
    """None for `method: none`, so transformers sees exactly what a user would pass."""
    if q.method == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    kwargs: dict = {"llm_int8_skip_modules": q.skip_modules}
    if q.method == "int8":
        kwargs.update(load_in_8bit=True, llm_int8_threshold=q.int8_threshold)
    else:
        kwargs.update(load_in_4bit=True, bnb_4bit_quant_type=q.method,
                      bnb_4bit_use_double_quant=q.double_quant,
                      bnb_4bit_quant_storage=getattr(torch, q.quant_storage))
        if q.compute_dtype:
            kwargs["bnb_4bit_compute_dtype"] = getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(**kwargs)


def describe_method(hf_quantizer) -> str:
    if hf_quantizer is None:
        return "none"
    qc = hf_quantizer.quantization_config
    if getattr(qc, "load_in_8bit", False):
        return "int8"
    name = getattr(qc, "bnb_4bit_quant_type", "4bit")
    if getattr(qc, "bnb_4bit_use_double_quant", False):
        name += "+double_quant"
    return name


def converted_and_skipped(model, original_classes: dict[str, str], hf_quantizer, user_skips):
    """Compare module classes before and after the quantizer's swap."""
    converted, skipped = [], []
    not_convert = set(getattr(hf_quantizer, "modules_to_not_convert", None) or [])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        before = original_classes.get(name)
        after = type(module).__name__
        if before is None:
            continue
        if after in QUANTIZED_CLASSES and before != after:
            converted.append({"module": name, "from": before, "to": after})
        elif before in QUANTIZABLE_CLASSES and after == before:
            skipped.append({"module": name, "reason": _skip_reason(name, module, output, not_convert,
                                                                   keep_fp32, user_skips)})
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


def dequantize_in_memory(model, dtype, original_classes: dict[str, str]) -> str:
    """transformers' `dequantize(dtype)`, then what it leaves undone: Conv1D layout and a single dtype.

    transformers turns every bnb module into an nn.Linear (so GPT-2's Conv1D weights come back
    transposed) and leaves embeddings, norms and biases in the load dtype; the result could not be
    saved as a checkpoint of the original architecture. Here both are mended.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    model.dequantize(dtype=dtype)
    restored = 0
    for name, module in list(model.named_modules()):
        if original_classes.get(name) == "Conv1D" and isinstance(module, torch.nn.Linear):
            conv = Conv1D(module.out_features, module.in_features)
            conv.weight = torch.nn.Parameter(module.weight.detach().t().contiguous())
            if module.bias is not None:
                conv.bias = module.bias
            model.set_submodule(name, conv)
            restored += 1
    cast = 0
    # Parameters and persistent buffers only: non-persistent ones (RoPE inv_freq) stay as
    # from_pretrained builds them, or the logits would differ from a reload of the saved folder.
    persistent = set(model.state_dict(keep_vars=True))
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in persistent or id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
            cast += 1
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    model.config.dtype = dtype
    return (f"dequantized to {str(dtype).removeprefix('torch.')}; {restored} Conv1D layout(s) restored, "
            f"{cast} other tensor(s) cast")
