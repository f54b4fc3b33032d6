"""One peft adapter merged into base tensors module by module, by peft's own merge code.

peft's `merge_and_unload` merges module by module: each tuner layer's `merge()` adds its delta to
its base layer's tensors with the type's own arithmetic (LoRA on CPU computes B @ A in fp32 for an
fp16/bf16 base and casts the delta back; DoRA rescales by the norm of W + ΔW; IA3 multiplies the
weight, and the bias of non-feedforward layers; LoHa / LoKr build Hadamard / Kronecker products;
fan_in_fan_out transposes for Conv1D), then swaps the layer for its base layer. Re-deriving every
type would drift from peft at each release, so instead peft injects the adapter into a hollow copy
of the base model (every base tensor a zero expanded to its shape: CPU, right dtype and shape, no
memory), creating and initializing the adapter's tensors as it always does, and `load_adapter`
loads the file into them exactly as `PeftModel.from_pretrained` does (same casts, autocast to
fp32, key remapping). To merge one module, its base tensors are put in from the checkpoint, the
layer's own `merge()` (or `unload_and_optionally_merge_module`, for modules_to_save and trainable
tokens) runs, and its tensors are read back; the module then goes hollow again. The adapter's own
tensors are read from its file module by module where `adapters.lazy_adapter` can map them (peft
injects them on meta, and fills a module's just before its merge); else `load_adapter` loads them
all. Memory: one module's adapter and base tensors (the whole adapter where it is held). The result
equals peft's bit for bit because it is peft's code on the same inputs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Collection

import torch

from qfinal.adapters.lazy_adapter import plan_lazy
from qfinal.adapters.lora_rows import RowDelta, row_delta
from qfinal.adapters.prepare import SAFETENSORS_NAME, Prepared
from qfinal.checkpoint.headers import read_safetensors_header
from qfinal.compat.peft_merge import check_merge_allowed, own_tensors, swap_tensor
from qfinal.errors import CheckpointError, ConfigError, QfinalError

_PREFIX = "base_model.model."
_SHOWN = 3


class AdapterMerger:
    """One adapter injected by peft into a hollow copy of the base (`model_class(hf_config)` in `dtype`).

    `units` maps each module peft merges (its path in the base model) to the checkpoint keys of the
    base tensors it changes or may change. `checkpoint_keys` are the base checkpoint's tensor names
    (in output space). `merge_base` refuses first the types a hollow base cannot merge
    (`peft_types.streaming_merge_refusal`).
    """

    def __init__(self, prep: Prepared, model_class, hf_config, dtype: torch.dtype, checkpoint_keys: Collection[str]):
        self.prep = prep
        self.name = prep.name
        keys = set(checkpoint_keys)
        self.overrides: dict[str, torch.Tensor] = {}  # checkpoint key -> the adapter file's tensor
        self.missing: list[str] = []
        self.lazy = None  # adapters.lazy_adapter.LazyAdapter: the tensors read unit by unit
        self.held_whole: str | None = "it is a pickle"  # else why the adapter is held whole
        file = prep.folder / SAFETENSORS_NAME
        header = read_safetensors_header(file)[0] if file.is_file() and not prep.tensors else None
        if header is not None:
            try:
                self._build(model_class, hf_config, dtype, lazy=True)
            except QfinalError:  # the eager injection below says why, if it fails as well
                self.held_whole = "peft cannot inject it on the meta device"
            else:
                units = [path for path, _module in _merge_units(self.peft_model)]
                lazy = plan_lazy(self.peft_model, self.name, str(file), header, units, set(self._aliases), dtype)
                self.lazy, self.held_whole = (lazy, None) if not isinstance(lazy, str) else (None, lazy)
        if self.lazy is None:  # peft's load_adapter, the whole adapter held
            self._build(model_class, hf_config, dtype, lazy=False)
            self._load(keys, set(header) if header is not None else set(prep.tensors))
        self._check_merge_allowed()
        self.units: dict[str, tuple[str, ...]] = {}
        self._rel: dict[str, list[tuple[str, str]]] = {}
        for path, module in _merge_units(self.peft_model):
            rel = self._base_tensors(path, module, keys)
            self._rel[path] = rel
            self.units[path] = tuple(key for _r, key in rel)
        if self.lazy is not None:  # held: one unit's tensors at a time, as peft holds them
            self.adapter_bytes = max((self.lazy.unit_bytes(path) for path in self.units), default=0)
        else:  # held whole, in fp32
            shapes = (
                [e.shape for e in header.values()] if header is not None else [t.shape for t in prep.tensors.values()]
            )
            self.adapter_bytes = sum(math.prod(shape) for shape in shapes) * 4
        prep.tensors = {}  # loaded: the file's copy is no longer needed

    def _build(self, model_class, hf_config, dtype: torch.dtype, lazy: bool) -> None:
        """A hollow base with the adapter injected (`lazy`: its tensors on meta); refused if peft
        rewrote a base weight as it injected."""
        hollow = _hollow_model(model_class, hf_config, dtype)
        aliases: dict[int, list[str]] = {}
        self._held = []  # the base's tensors, kept alive: their ids in `_aliases` must not be reused
        for store in (hollow.named_parameters(remove_duplicate=False), hollow.named_buffers(remove_duplicate=False)):
            for name, tensor in store:
                aliases.setdefault(id(tensor), []).append(name)
                self._held.append(tensor)
        self._aliases = aliases
        storage = [(tensor, tensor.data_ptr()) for tensor in self._held]
        self.peft_model = _inject(hollow, self.prep, lazy)
        changed = [aliases[id(tensor)][0] for tensor, at in storage if tensor.data_ptr() != at]
        if changed:  # PiSSA, OLoRA, LoftQ...: the base's weight minus the initial adapter
            raise _base_changed(self.prep, changed)

    def loaded(self, path: str):
        """A block in which the unit's adapter tensors are in memory (always, when held whole)."""
        return self.lazy.loaded(path) if self.lazy is not None else nullcontext()

    def _load(self, keys: set[str], file_keys: set[str]) -> None:
        """Load the adapter's tensors with `load_adapter`, as `PeftModel.from_pretrained` does."""
        carried = self._carried(keys, file_keys)
        _give_storage(self.peft_model, set(self._aliases))
        try:
            result = self.peft_model.load_adapter(str(self.prep.folder), self.name, is_trainable=False)
        except Exception as exc:  # peft's refusals, and safetensors' (a dtype it cannot read, a bad file)
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(
                f"peft could not load adapter '{self.name}' onto this base: {detail[:300]}",
                where=str(self.prep.spec.path),
                hint="is it an adapter for this model (same architecture and shapes)?",
            ) from None
        _refuse_if(
            list(getattr(result, "unexpected_keys", []) or []),
            self.prep,
            "holds tensor(s) that match no module of this base",
        )
        # injected tensors the file did not fill keep peft's initialization, as in peft
        self.missing = sorted(getattr(result, "missing_keys", []) or [])
        for name, param in carried.items():
            self.overrides[name] = param.data
            param.data = torch.zeros((), dtype=param.dtype).expand(param.shape)

    def _check_merge_allowed(self) -> None:
        try:
            check_merge_allowed(self.peft_model)
        except ValueError as exc:
            detail = (str(exc).strip().splitlines() or ["merge not allowed"])[0]
            raise ConfigError(
                f"peft refuses to merge adapter '{self.name}': {detail}", where=str(self.prep.spec.path)
            ) from None

    def _carried(self, keys: set[str], file_keys: set[str]) -> dict:
        """Base tensors the adapter file holds itself (embedding layers saved with
        `save_embedding_layers`): they get memory for `load_adapter` to fill, and then replace the
        base's (`overrides`, by checkpoint key), as loading the adapter replaces them in peft."""
        named = dict(self.peft_model.named_parameters(remove_duplicate=False))
        named.update(self.peft_model.named_buffers(remove_duplicate=False))
        carried = {}
        for file_key in file_keys:
            tensor = named.get(file_key)
            if tensor is None or id(tensor) not in self._aliases:
                continue
            key = next((a for a in self._aliases[id(tensor)] if a in keys), None)
            if key is None:
                continue
            tensor.data = torch.empty(tensor.shape, dtype=tensor.dtype)
            carried[key] = tensor
        return carried

    def _base_tensors(self, path: str, unit, keys: set[str]) -> list[tuple[str, str]]:
        """(name inside the unit's base module, checkpoint key) for each base tensor under `unit`."""
        base = _base_module(unit)
        out = []
        for store in (base.named_parameters(remove_duplicate=False), base.named_buffers(remove_duplicate=False)):
            for rel, tensor in store:
                key = next((a for a in self._aliases.get(id(tensor), []) if a in keys), None)
                if key is not None:
                    out.append((rel, key))
        if not out:
            raise CheckpointError(
                f"module {path!r} that adapter '{self.name}' merges into has no tensor in the checkpoint",
                where=str(self.prep.spec.path),
                hint="the checkpoint's names differ from the model's (a layout transformers converts on "
                "load); streaming merge needs them to match",
            )
        return out

    def row_delta(self, path: str, shapes) -> tuple[str, RowDelta] | None:
        """(checkpoint key of the unit's base weight, the adapter's row-wise delta to it) when peft's
        merge of `path` is a plain LoRA's (`adapters.lora_rows`): the unit's other tensors then stay
        the base's. `shapes`: checkpoint key -> shape."""
        key = next((key for rel, key in self._rel[path] if rel == "weight"), None)
        if key is None:
            return None
        delta = row_delta(self.peft_model.base_model.model.get_submodule(path), self.name, shapes[key])
        return None if delta is None else (key, delta)

    def merge_unit(self, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unit's base tensors (checkpoint key -> tensor, owned: merged in place) after peft's merge."""
        with self.loaded(path):
            return self._merge_loaded(path, tensors)

    def _merge_loaded(self, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unit = self.peft_model.base_model.model.get_submodule(path)
        base = _base_module(unit)
        saved = []
        try:
            for rel, key in self._rel[path]:
                owner, attr = _owner(base, rel)
                saved.append((owner, attr, swap_tensor(owner, attr, tensors[key])))
            result = self._merge(path, unit)
            out = {}
            for rel, key in self._rel[path]:
                owner, attr = _owner(result, rel)
                out[key] = getattr(owner, attr).detach()
            return out
        finally:
            for owner, attr, old in saved:
                swap_tensor(owner, attr, old)
            if isinstance(getattr(unit, "merged_adapters", None), list):
                unit.merged_adapters.clear()

    def _merge(self, path: str, unit):
        """peft's merge of one module, as `_unload_and_optionally_merge` does it; its refusal in one line."""
        try:
            if hasattr(unit, "unload_and_optionally_merge_module"):
                return unit.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            unit.merge(safe_merge=False, adapter_names=None)
            return unit.get_base_layer()
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"peft could not merge adapter '{self.name}' into {path}: {detail[:300]}",
                where=str(self.prep.spec.path),
            ) from None


def _refuse_if(keys: list[str], prep: Prepared, what: str) -> None:
    if keys:
        shown = ", ".join(keys[:_SHOWN]) + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
        raise CheckpointError(
            f"adapter '{prep.name}' {what}: {shown}",
            where=str(prep.spec.path),
            hint="is it an adapter for this base (same architecture, names and shapes)?",
        )


def _hollow_model(model_class, hf_config, dtype: torch.dtype):
    """`model_class(hf_config)` whose every tensor is a zero expanded to its shape: the right device
    (CPU), dtype and shape for peft's injection, so the adapter's own tensors are created, initialized
    and kept on the CPU as in peft, while the base's take no memory."""
    from qfinal.compat.transformers import build_skeleton

    model = build_skeleton(model_class, hf_config, dtype, False)
    model.tie_weights()
    done: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor
    for module in model.modules():
        for attr, tensor in own_tensors(module):
            if not tensor.is_meta:
                continue
            if id(tensor) not in done:
                hollow = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
                is_param = isinstance(tensor, torch.nn.Parameter)
                done[id(tensor)] = torch.nn.Parameter(hollow, requires_grad=False) if is_param else hollow
            swap_tensor(module, attr, done[id(tensor)])
    return model.eval()


def _give_storage(model, base_ids: set[int]) -> None:
    """Hollow tensors that are not the base's (peft's copies of base modules: modules_to_save) get
    memory of their own, for the adapter file to fill."""
    for module in model.modules():
        for attr, tensor in own_tensors(module):
            if id(tensor) in base_ids or tensor.numel() < 2 or 0 not in tensor.stride():
                continue
            swap_tensor(module, attr, torch.empty(tensor.shape, dtype=tensor.dtype))


def _inject(hollow, prep: Prepared, lazy: bool):
    """The PeftModel class `PeftModel.from_pretrained` picks for the adapter's task type, around
    `hollow`; with `lazy` the adapter's tensors on meta (`low_cpu_mem_usage`)."""
    from peft import PeftConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    config = PeftConfig.from_pretrained(str(prep.folder))
    config.inference_mode = True
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    try:
        return cls(hollow, config, prep.name, low_cpu_mem_usage=lazy)
    except ImportError as exc:  # peft's optional-backend checks (gptqmodel without optimum, ...)
        raise ConfigError(
            f"peft cannot build the adapter's layers in this environment: {exc}",
            where=str(prep.spec.path),
            hint="fix the named package (peft checks it for every layer it builds)",
        ) from None
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, RuntimeError) and "written-to tensor" in detail:  # an in-place write to a hollow tensor
            raise _base_changed(prep, []) from None
        raise CheckpointError(
            f"peft could not apply adapter '{prep.name}' to this base: {detail[:300]}",
            where=str(prep.spec.path),
            hint="is it an adapter for this model?",
        ) from None


def _base_changed(prep: Prepared, tensors: list[str]) -> ConfigError:
    """peft rewrites base weights as it injects this adapter (an initialization from the weight's
    SVD, as PiSSA's W - B0 A0): into a hollow base that is another model than peft's."""
    init = prep.config.get("init_lora_weights")
    how = f" (init_lora_weights={init!r})" if isinstance(init, str) else ""
    some = (
        f": {', '.join(tensors[:2])}" + (f" (+{len(tensors) - 2} more)" if len(tensors) > 2 else "") if tensors else ""
    )
    return ConfigError(
        f"adapter '{prep.name}' cannot be merged shard by shard: peft changes the base weights as it "
        f"injects it{how}{some}, and the streaming merge never holds them",
        where=str(prep.spec.path),
        hint="merge it in memory: qfinal save BASE OUT --adapter DIR --merge",
    )


def _merge_units(peft_model):
    """(path in the base model, module) for each module `merge_and_unload` merges, in its order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.base_model.model
    tuners = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if any(parent == t or parent.startswith(t + ".") for t in tuners):
            continue
        if hasattr(module, "unload_and_optionally_merge_module") or hasattr(module, "base_layer"):
            yield name, module


def _base_module(unit):
    """The module whose tensors are the base's: the tuner layer's base layer, a wrapper's original."""
    original = getattr(unit, "original_module", None)
    if original is not None:
        return original
    return unit.get_base_layer()


def _owner(module, rel: str):
    parent, _, attr = rel.rpartition(".")
    return (module.get_submodule(parent) if parent else module), attr
