"""What a quantization format is to qfinal: one object per format, registered in `qfinal.formats`.

A format answers, for its own checkpoints and models: is this config.json mine (`detect`); are
the stored quant-state tensors consistent with it (`quant_state_findings`, headers only); which
stored tensors are quant state; how one weight is rebuilt from its stored tensors (streaming
`dequantize`); how a loaded model is dequantized in memory; and what transformers' quantizer did
(bitsandbytes, the only method qfinal quantizes with, also says what it is told). Adding a format
is one module implementing this class plus one line in the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from qfinal.errors import CheckpointError
from qfinal.report import Finding

_STATE_CHECK = "quantization_config"


def problem_findings(problems: Iterable[tuple[str | None, str]]) -> list[Finding]:
    """A quant-state check's (key, message) problems as error findings."""
    return [Finding(check=_STATE_CHECK, severity="error", key=k, message=m) for k, m in problems]


def matched_findings(summary: str) -> list[Finding]:
    """A quant-state check that found nothing wrong: one info line, `summary` saying what it checked."""
    return [Finding(check=_STATE_CHECK, severity="info", message=f"quant state matches quantization_config {summary}")]


MAX_LISTED = 8  # keys named inline in one finding message


def listing(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    """`keys` for a finding message: the first `limit`, then how many more."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint's quantization_config says, as `qfinal dequantize` reports it."""

    method: str  # "nf4" | "fp4" | "int8" for bitsandbytes
    double_quant: bool = False  # nested quantization of the scales

    @property
    def label(self) -> str:
        return self.method + ("+double_quant" if self.double_quant else "")


@dataclass
class StoredWeight:
    """One quantized weight among a checkpoint's tensors, and the tensors it is rebuilt from."""

    name: str  # the weight's key in the plain checkpoint
    kind: str  # the format's own label for how it is stored ("4bit", "int8")
    parts: dict[str, str]  # role -> stored key
    shape: list[int]  # the dequantized shape, in the module's layout


Read = Callable[[str], object]  # stored key -> tensor


class QuantFormat(ABC):
    """One quantization format. `name` is config.json's `quantization_config.quant_method`."""

    name: str
    quantized_classes: tuple[str, ...] = ()  # module classes transformers' quantizer swaps in
    readable: bool = True  # False for a method detected only to be refused (formats/refused.py)

    def load_refusal(self, raw_config: dict) -> str | None:
        """Why the pipeline must not load a checkpoint in this format (transformers would load it
        wrong here, or cannot), or None when it loads it faithfully."""
        return None

    def dequantizes_on_load(self, raw_config: dict) -> str | None:
        """Why qfinal's load rebuilds this format's weights itself (dense, with `dequantize`, as the
        loader reads them) instead of handing them to transformers' quantizer; None when
        transformers loads them faithfully on this machine."""
        return None

    # ------------------------------------------------------------------ config.json and headers

    @abstractmethod
    def detect(self, raw_config: dict) -> bool:
        """True when config.json's quantization_config is this format's."""

    @abstractmethod
    def scheme(self, raw_config: dict, where: str) -> Scheme:
        """The stored scheme; CheckpointError when the quantization_config cannot be read."""

    @abstractmethod
    def is_quant_state_key(self, key: str) -> bool:
        """True for a stored tensor that is quant state beside a weight, not a weight itself."""

    def packed_weight_keys(self, tensors: Iterable[str]) -> set[str]:
        """Stored keys of quantized weights (their dtype is the storage's, not the model's)."""
        return set()

    @abstractmethod
    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """quantization_config findings for a checkpoint whose config.json `detect`s as this format."""

    # ------------------------------------------------------------------ streaming dequantize

    @abstractmethod
    def find_weights(
        self, headers: dict[str, tuple[str, list[int]]], read: Read, scheme: Scheme, where: str
    ) -> list[StoredWeight]:
        """Every quantized weight of a checkpoint from its headers (key -> (dtype code, shape))."""

    @abstractmethod
    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        """`weight` rebuilt from its stored tensors, exactly as transformers' dequantize() does it,
        in the format's own result dtype (the caller casts)."""

    def verify_reference(self, model_class, folder):
        """SOURCE's model as the format's own library dequantizes it (float32 where it can), the
        reference `qfinal dequantize --verify` compares OUT with: by default transformers' load
        then `dequantize(torch.float32)`."""
        import torch

        reference = model_class.from_pretrained(folder).eval()
        reference.dequantize(torch.float32)
        return reference

    # ------------------------------------------------------------------ a loaded model

    def loaded_method(self, model) -> str | None:
        """The method of a model holding this format's quantized parameters, else None."""
        return None

    def state_tensors(self, model) -> Iterator[tuple[str, object]]:
        """(name, tensor) for quant state a loaded model holds outside its parameters and buffers."""
        return iter(())

    def holds_packed_data(self, tensor) -> bool:
        """True for a tensor holding packed codes, whose bytes are not values."""
        return False

    def held_bytes(self, tensor) -> int | None:
        """Bytes a loaded tensor of this format really holds, where numel x element size is not
        that (a tensor subclass keeping components of its own); None otherwise."""
        return None

    def planned_sizes(self, inventory) -> dict[str, int] | None:
        """Bytes each parameter will hold once loaded, read once from the checkpoint's headers, for
        the parameters the format loads as stored components rather than tensors of the skeleton's
        shape and dtype (what `qfinal plan` counts otherwise); None when it loads none so."""
        return None

    def dequantize_in_memory(self, model, dtype, original_classes: dict[str, str]) -> str:
        """transformers' `dequantize(dtype)`, then what it leaves undone: Conv1D layout and a single dtype.

        transformers turns every quantized module into an nn.Linear (so GPT-2's Conv1D weights come
        back transposed) and leaves embeddings, norms and biases in the load dtype; the result could
        not be saved as a checkpoint of the original architecture. Here both are mended.
        """
        model.dequantize(dtype=dtype)
        done = finish_dequantized(model, dtype, original_classes)
        return f"dequantized to {str(dtype).removeprefix('torch.')}; {done}"

    # ------------------------------------------------------------------ transformers' quantizer
    # Only a format `qfinal.formats.quantizer_format` hands to transformers (loaded faithfully, not
    # dequantized on load, not refused) is ever asked these and `dequantize_in_memory`.

    def describe_method(self, hf_quantizer) -> str:
        """The method a transformers quantizer applies, as the report names it."""
        return "none" if hf_quantizer is None else self.name

    def converted_and_skipped(
        self, model, original_classes: dict[str, str], hf_quantizer, user_skips
    ) -> tuple[list[dict], list[dict]]:
        """The modules the quantizer swapped (from/to class) and those it kept, with why."""
        return [], []


def stored_checkpoint(folder: Path):
    """SOURCE's inventory and a reader of its tensors by key across its shards, found as the loader
    finds them (`inspect_checkpoint`: the index checked, the files confined to the folder): what
    the `--verify` references read. CheckpointError for a checkpoint with a problem."""
    from qfinal.checkpoint.inventory import inspect_checkpoint
    from qfinal.checkpoint.reader import TensorReader

    inventory = inspect_checkpoint(Path(folder))
    inventory.raise_for_problems()
    if inventory.format != "safetensors":
        raise CheckpointError("--verify reads safetensors checkpoints only", where=str(folder))
    return inventory, TensorReader.for_inventory(inventory)


def all_stored_tensors(folder: Path) -> dict:
    """Every tensor of the checkpoint by key, shard by shard in name order, each shard's keys sorted."""
    inventory, reader = stored_checkpoint(folder)
    keys = sorted(inventory.tensors, key=lambda key: (inventory.tensors[key].file, key))
    with reader:
        return {key: reader.get(key) for key in keys}


def finish_dequantized(model, dtype, original_classes: dict[str, str]) -> str:
    """What every in-memory dequantization ends with: Conv1D layouts restored, every other floating
    tensor cast to `dtype`, the quantized flags cleared and config.dtype set; says what it did."""
    restored = restore_conv1d(model, original_classes)
    cast = cast_floating(model, dtype)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    model.config.dtype = dtype
    return f"{restored} Conv1D layout(s) restored, {cast} other tensor(s) cast"


def restore_conv1d(model, original_classes: dict[str, str]) -> int:
    """Put back the Conv1D modules dequantize() turned into nn.Linear, weights in [in, out] again."""
    import torch
    from transformers.pytorch_utils import Conv1D

    restored = 0
    for name, module in list(model.named_modules()):
        if original_classes.get(name) == "Conv1D" and isinstance(module, torch.nn.Linear):
            conv = Conv1D(module.out_features, module.in_features)
            conv.weight = torch.nn.Parameter(module.weight.detach().t().contiguous())
            if module.bias is not None:
                conv.bias = module.bias
            model.set_submodule(name, conv)
            restored += 1
    return restored


def cast_floating(model, dtype) -> int:
    """Cast every floating parameter and persistent buffer to `dtype`; how many were cast.

    Non-persistent buffers (RoPE inv_freq) stay as from_pretrained builds them, or the logits
    would differ from a reload of the saved folder."""
    cast = 0
    persistent = set(model.state_dict(keep_vars=True))
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in persistent or id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
            cast += 1
    return cast
