"""Every private transformers call qfinal makes, in one place.

transformers has no public API for the individual steps of `from_pretrained`; qfinal's stages are
those steps. Keeping the private names here means a transformers upgrade breaks one module, and
the pinned range in pyproject.toml says which releases the tests cover.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.core_model_loading import (  # noqa: F401  (fast validate renames keys like the loader)
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)
from transformers.integrations.accelerate import (  # noqa: F401  (re-exported)
    _get_device_map,
    accelerate_dispatch,
    check_and_set_device_map,
)
from transformers.modeling_utils import LoadStateDictConfig  # noqa: F401  (re-exported)
from transformers.modeling_utils import _get_dtype as resolve_dtype  # noqa: F401  (re-exported)
from transformers.quantizers.auto import get_hf_quantizer  # noqa: F401

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

        raise ConfigError(
            "the bitsandbytes-quantized model does not fit and would be offloaded to disk, "
            "which bitsandbytes cannot run",
            where="max_memory",
            hint="raise max_memory so the model fits in memory, or load without quantization "
            "(offload works for unquantized models)",
        ) from None


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
        hf_quantizer.preprocess_model(
            model=model, dtype=dtype, device_map=device_map, checkpoint_files=checkpoint_files, use_kernels=False
        )


def attn_implementation(config) -> str | None:
    """The attention implementation a (sub-)config dispatches to; transformers keeps it private."""
    return getattr(config, "_attn_implementation", None)


def build_skeleton_with_attention(model_class, hf_config, dtype, is_quantized: bool, requested: str | None):
    """`build_skeleton` with `attn_implementation=requested` set on the config first, as
    `from_pretrained(attn_implementation=...)` does. Returns (model, why it fell back or None):
    transformers refuses an implementation it cannot run here (flash-attn missing, no GPU), and
    then the model is built with the config's default."""
    if requested is None:
        return build_skeleton(model_class, hf_config, dtype, is_quantized), None
    default = hf_config._attn_implementation
    hf_config._attn_implementation = requested
    try:
        return build_skeleton(model_class, hf_config, dtype, is_quantized), None
    except (ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hf_config._attn_implementation = default
        return build_skeleton(model_class, hf_config, dtype, is_quantized), reason


def keep_in_fp32_modules(model, *, strict: bool = True) -> set[str]:
    """Module names the model class keeps in float32: `_keep_in_fp32_modules`, and with `strict`
    `_keep_in_fp32_modules_strict` too."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if strict:
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return names


def class_tied_weights_keys(module):
    """The tie mapping (target -> source) a model class declares, `_tied_weights_keys`, or None."""
    return getattr(module, "_tied_weights_keys", None)


def is_offloaded(module) -> bool:
    """True when accelerate's hook (set by the dispatch) loads this module's weights on use."""
    hook = getattr(module, "_hf_hook", None)
    return bool(hook is not None and getattr(hook, "offload", False))


def non_persistent_buffer_names(module) -> set[str]:
    """The module's own buffers that torch leaves out of its state dict."""
    return module._non_persistent_buffers_set


@dataclass(frozen=True)
class AutoTask:
    """One task: transformers' Auto mapping for it, the peft task type of adapters trained for it, and
    the class-name endings that mark a model class for it when the mapping does not list the class."""

    mapping: str  # a transformers top-level auto mapping (config class -> model class)
    peft_task_type: str | None
    suffixes: tuple[str, ...] = ()


# config `task:` -> its AutoTask: one table for picking a model class and for judging an adapter's task
AUTO_TASKS = {
    "causal-lm": AutoTask("MODEL_FOR_CAUSAL_LM_MAPPING", "CAUSAL_LM", ("ForCausalLM", "LMHeadModel")),
    "masked-lm": AutoTask("MODEL_FOR_MASKED_LM_MAPPING", None),
    "seq2seq-lm": AutoTask(
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", "SEQ_2_SEQ_LM", ("ForConditionalGeneration", "ForSeq2SeqLM")
    ),
    "sequence-classification": AutoTask(
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", "SEQ_CLS", ("ForSequenceClassification",)
    ),
    "token-classification": AutoTask(
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING", "TOKEN_CLS", ("ForTokenClassification",)
    ),
    "question-answering": AutoTask("MODEL_FOR_QUESTION_ANSWERING_MAPPING", "QUESTION_ANS", ("ForQuestionAnswering",)),
    "base": AutoTask("MODEL_MAPPING", "FEATURE_EXTRACTION"),
}


def auto_model_class(task: str, hf_config):
    """The class the Auto mapping of `task` gives for `hf_config`; KeyError when it has none."""
    import transformers

    return getattr(transformers, AUTO_TASKS[task].mapping)[type(hf_config)]


def class_fits_peft_task(peft_task_type: str, class_name: str) -> bool:
    """Whether a model class named `class_name` serves peft's `peft_task_type`: the task's Auto mapping
    lists it for some model type, or its name ends like the task's classes. True for a task type no
    Auto mapping stands for."""
    task = next((t for t in AUTO_TASKS.values() if t.peft_task_type == peft_task_type), None)
    if task is None:
        return True
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, f"{task.mapping}_NAMES", {}).values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return class_name in names or (bool(task.suffixes) and class_name.endswith(task.suffixes))
