"""What `save_pretrained` decides for a model quantized on load, answered from the meta skeleton.

`qfinal quantize` writes the files transformers would write after `from_pretrained(...,
quantization_config=...)` + `save_pretrained`, without building the model: which keys are kept
(ties removed by transformers' own function, `_keys_to_ignore_on_save` dropped), the dtype the
loader casts each checkpoint tensor to, the index's `total_parameters`, and config.json /
generation_config.json themselves, written by transformers' own config code.
"""

from __future__ import annotations

from pathlib import Path


def saved_keys(model) -> list[str]:
    """The state-dict keys `save_pretrained` keeps, in state-dict order, for a skeleton on the meta
    device: tied aliases dropped as transformers drops them (the skeleton is tied first, as the
    loaded model is), then `_keys_to_ignore_on_save`."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.tie_weights()
    state = model.state_dict(keep_vars=True)
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        kept.pop(key, None)
    return [key for key in state if key in kept]


def loader_dtypes(model, keys, dtype, quantized: set[str]) -> dict:
    """key -> the dtype transformers' loader casts the checkpoint tensor to when it quantizes on
    load (`convert_and_load_state_dict_in_model`): the model dtype, a keep-in-fp32 plan's dtype where
    its pattern matches, else the skeleton's own dtype for keys that are not quantized."""
    plan = model._get_dtype_plan(dtype)
    pattern = by_group = None
    if plan:
        from transformers.core_model_loading import build_glob_alternation

        pattern, by_group, _targets = build_glob_alternation(list(plan))
    state = model.state_dict(keep_vars=True)
    out = {}
    for key in keys:
        chosen = dtype
        match = pattern.search(key) if pattern is not None else None
        if match is not None:
            chosen = plan[by_group[match.lastgroup]]
        elif key in state and state[key].dtype != chosen and key not in quantized:
            chosen = state[key].dtype
        out[key] = chosen
    return out


def total_parameters(model, packed_numel: dict[str, int]) -> int:
    """`model.num_parameters()` of the quantized model: a 4-bit weight counts 2 x its packed bytes
    (`packed_numel` maps those weights' names to their packed element count x element size)."""
    total = 0
    for name, param in model.named_parameters():  # tied parameters once, as transformers counts
        total += packed_numel[name] * 2 if name in packed_numel else param.numel()
    return total


def write_configs(model, folder: Path) -> list[str]:
    """config.json (and generation_config.json for a generative model) as `save_pretrained` writes
    them: `dtype` from the model's parameters, `architectures` from its class."""
    dtype = model.dtype
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(folder)
    written = ["config.json"]
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
        written.append("generation_config.json")
    return written


def save_order(model, hf_quantizer, names: list[str]) -> list[str]:
    """The order `save_pretrained` hands the state dict to the shard splitter: `revert_weight_conversion`
    rebuilds it sorted by `dot_natural_key` whenever the load used a conversion mapping (most models
    have one), else the state dict's own order."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import dot_natural_key

    if not get_model_conversion_mapping(model, None, hf_quantizer):
        return list(names)
    return sorted(names, key=dot_natural_key)


__all__ = ["saved_keys", "loader_dtypes", "total_parameters", "write_configs", "save_order"]
