"""Every private transformers call qfinal makes, in one place.

transformers has no public API for the individual steps of `from_pretrained`; qfinal's stages are
those steps. Keeping the private names here means a transformers upgrade breaks one module, and
the pinned range in pyproject.toml says which releases the tests cover.
"""

from __future__ import annotations

from transformers.integrations.accelerate import (  # noqa: F401  (re-exported)
    _get_device_map,
    accelerate_dispatch,
    check_and_set_device_map,
)
from transformers.modeling_utils import (  # noqa: F401
    LoadStateDictConfig,
    _get_dtype as resolve_dtype,
)
from transformers.quantizers.auto import get_hf_quantizer  # noqa: F401
from transformers.core_model_loading import (  # noqa: F401  (fast validate renames keys like the loader)
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)

SUPPORTED_TRANSFORMERS = ">=5.23,<5.24"


def get_device_map(model, device_map, max_memory, hf_quantizer):
    """transformers' device-map inference (honouring `max_memory`); a bnb model that would spill to
    the CPU or disk beside an accelerator, or to disk at all, is a usage error, not a crash."""
    try:
        return _get_device_map(model, device_map, max_memory, hf_quantizer)
    except ValueError as err:
        if "dispatched on the CPU or the disk" not in str(err):  # the quantizer's validate_environment
            raise
        from qfinal.errors import ConfigError

        raise ConfigError("the bitsandbytes-quantized model does not fit and would be offloaded to disk, "
                          "which bitsandbytes cannot run", where="max_memory",
                          hint="raise max_memory so the model fits in memory, or load without quantization "
                               "(offload works for unquantized models)") from None


def init_contexts(model_class, dtype, is_quantized: bool):
    """Context managers transformers enters to build a model skeleton on the meta device."""
    return model_class.get_init_context(dtype, is_quantized, False, False)


def load_checkpoint_into(model, checkpoint_files, load_config, state_dict=None):
    """Stream the checkpoint into `model` along the device map; returns (loading_info, disk_offload_index).

    `state_dict` may hold lazy safetensors slices (transformers then reads those instead of
    mmapping `checkpoint_files` itself)."""
    return type(model)._load_pretrained_model(model, state_dict, checkpoint_files, load_config)


def materialize_missing(model, loading_info, load_config) -> None:
    """What `_finalize_model_loading` does before tying: keep tied targets from random init, move missing
    keys and non-persistent buffers off meta, initialize what the checkpoint did not hold."""
    model.mark_tied_weights_as_initialized(loading_info)
    model._move_missing_keys_from_meta_to_device(
        loading_info.missing_and_mismatched(),
        load_config.device_map,
        load_config.device_mesh,
        load_config.hf_quantizer,
    )
    model._initialize_missing_keys(load_config.is_quantized)


def tie_and_adjust(model, loading_info) -> None:
    """The tail of `_finalize_model_loading`: tie, then drop keys the model declares ignorable."""
    model.tie_weights(missing_keys=loading_info.missing_keys, recompute_mapping=False)
    model._adjust_missing_and_unexpected_keys(loading_info)


def dtype_plan(model, dtype):
    return model._get_dtype_plan(dtype)


def weight_conversions(model, hf_quantizer):
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model, None, hf_quantizer)


def build_skeleton(model_class, hf_config, dtype, is_quantized: bool):
    """`cls(config)` under transformers' own init contexts: meta device, no init, no tying yet."""
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils.generic import ContextManagers

    with ContextManagers(init_contexts(model_class, dtype, is_quantized)):
        model = model_class(hf_config)
        patch_output_recorders(model)
    return model


def adjust_keys(model, loading_info) -> None:
    """Drop missing/unexpected keys the model declares ignorable (inv_freq, position_ids, ...)."""
    model._adjust_missing_and_unexpected_keys(loading_info)


def remove_tied_weights(state_dict: dict, model) -> dict:
    """Drop tied aliases exactly as `save_pretrained` does (safetensors forbids aliasing)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(state_dict, model)


def save_pretrained(model, folder, max_shard_size, write_file) -> None:
    """`model.save_pretrained(folder, max_shard_size=...)` with every weight file written by
    `write_file`, a drop-in for safetensors' `save_file` (same arguments, same bytes): everything
    else (which tensors, their names, the shards, the index, the config) stays transformers' own.
    The swap is process-wide while it lasts; another thread saving meanwhile gets the same bytes."""
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file
    modeling_utils.safe_save_file = write_file
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        modeling_utils.safe_save_file = original


def quantizer_preprocess(hf_quantizer, model, model_class, dtype, device_map, checkpoint_files) -> None:
    """The quantizer's module swap, inside the same init contexts as the skeleton (as from_pretrained)."""
    from transformers.utils.generic import ContextManagers

    with ContextManagers(init_contexts(model_class, dtype, True)):
        hf_quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map,
                                      checkpoint_files=checkpoint_files, use_kernels=False)
