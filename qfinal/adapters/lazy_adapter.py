"""An adapter's tensors read from its file one merge unit at a time, as peft's load would fill them.

peft's `load_adapter` holds the whole adapter, upcast to fp32: 160 MB for a r=16 all-linear LoRA of
a 7B model, 50 MB for a 1.1B one, so a merge that keeps it is not flat in model size. Here peft
injects the adapter with `low_cpu_mem_usage=True` (its tensors on the meta device, created and
cast as usual) and its public `set_peft_model_state_dict` loads *probes* into it: for each file
tensor a zero expanded to its shape, no memory. The model tensor that took a probe's storage is the
one peft fills from that file key, after every renaming peft does (adapter name, wrappers, the
transformers conversion). From then on a unit's tensors are read (pread, not mmap: mapped pages
would stay in the process's RSS) just before its merge, converted to the dtype of the injected
tensor (peft's eager load copies the file into that tensor: the same conversion; for an fp32,
fp16 or bf16 model the meta injection gives float tensors the eager one's dtype, fp32), and put
back on meta after it. What the probe load changed in tensors the file does not fill is undone.
Memory: one unit's adapter tensors.

The map is used only where it is complete and local. `plan_lazy` returns why not (the adapter is then
loaded whole by `load_adapter`) when a file key became no model tensor (peft built a new tensor from
it), a tensor the file does not fill is left on meta (peft would keep its initialization), a file
key lands outside one merge unit (shared tensors: VeRA's projections, VB-LoRA's bank) or in a base
tensor (embeddings saved with the adapter), or the probe load itself fails or leaves unexpected keys
(the eager load then says why, as before).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qfinal.checkpoint.dtypes import torch_dtype_of
from qfinal.checkpoint.row_slabs import read_tensor
from qfinal.compat.peft_merge import own_tensors, swap_tensor

_PREFIX = "base_model.model."  # a PeftModel's path to the base model's modules
# model dtypes for which a tensor injected on meta ends in the dtype the eager injection gives it
# (created in fp32, or cast to the base's 16-bit dtype and autocast back to fp32)
_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class FileTensor:
    """One file tensor and the model tensors peft fills from it (one, or a few aliases)."""

    key: str
    stored: torch.dtype  # as in the file
    dtype: torch.dtype  # as peft holds it once loaded
    shape: tuple[int, ...]
    owners: list[tuple[torch.nn.Module, str]]

    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


class LazyAdapter:
    """The adapter's tensors by merge unit, read from `path` (a safetensors file) on demand."""

    def __init__(self, path: str, units: dict[str, list[FileTensor]]):
        self.path = path
        self.units = units

    def unit_bytes(self, unit: str) -> int:
        return sum(t.nbytes() for t in self.units.get(unit, ()))

    @contextmanager
    def loaded(self, unit: str):
        """The unit's adapter tensors in memory for the block's duration, on meta again after."""
        tensors = self.units.get(unit, ())
        try:
            for t in tensors:
                value = read_tensor(self.path, t.key, t.stored, t.shape).to(t.dtype)
                for module, attr in t.owners:
                    swap_tensor(module, attr, value)
            yield
        finally:
            for t in tensors:
                hollow = torch.empty(t.shape, dtype=t.dtype, device="meta")
                for module, attr in t.owners:
                    swap_tensor(module, attr, hollow)


def plan_lazy(
    peft_model, adapter: str, path: str, header: dict, units: list[str], base_ids: set[int], dtype
) -> LazyAdapter | str:
    """A LazyAdapter for `adapter`, freshly injected with `low_cpu_mem_usage=True` into `peft_model`,
    whose file `path` has `header` (key -> `checkpoint.headers.TensorEntry`); `units` are the merge
    units' paths in the base model, `base_ids` the ids of the base's tensors, `dtype` the model's.
    Else why the adapter must be loaded whole (see the module's docstring); the model is then spoilt."""
    from peft import set_peft_model_state_dict

    if dtype not in _MODEL_DTYPES:
        return f"the model is {dtype}"
    # (id(module), attr) -> (the tensor peft injected, its data then): its dtype is what peft's eager
    # load copies the file into; the probe load may move tensors the file does not fill
    injected = {}
    places: dict[int, int] = {}  # id(tensor) -> how many (module, attr) hold it
    for module in peft_model.modules():
        for attr, tensor in own_tensors(module):
            injected[id(module), attr] = (tensor, tensor.data)
            places[id(tensor)] = places.get(id(tensor), 0) + 1
    probes, stored = {}, {}
    for key, entry in header.items():
        try:
            stored[key] = torch_dtype_of(entry.dtype)
        except ValueError:
            return f"tensor {key!r} has dtype {entry.dtype}, which torch has not"
        # the model's dtype, so that peft's move of the adapter to its base layer's dtype is a no-op
        kind = dtype if stored[key].is_floating_point else stored[key]
        probes[key] = torch.zeros((), dtype=kind).expand(entry.shape)
    by_storage = {p.data_ptr(): key for key, p in probes.items()}
    if len(by_storage) != len(probes):
        return "the probes share storage"
    try:
        result = set_peft_model_state_dict(peft_model, probes, adapter_name=adapter, low_cpu_mem_usage=True)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        return f"peft's load of the probes failed ({type(exc).__name__})"
    if getattr(result, "unexpected_keys", None):
        return "the file has keys peft does not load"
    names: dict[int, set[str | None]] = {}  # every path of each module in the base model; None: outside it
    for name, module in peft_model.named_modules(remove_duplicate=False):
        inner = name.removeprefix(_PREFIX) if name.startswith(_PREFIX) else None
        names.setdefault(id(module), set()).add(inner)
    found: dict[str, FileTensor] = {}
    unit_of: dict[str, str] = {}
    for module in peft_model.modules():
        for attr, tensor in own_tensors(module):
            if tensor.is_meta:
                return "the file leaves a tensor to its initialization"
            key = by_storage.get(tensor.data_ptr())
            if key is None:
                if not _restore(module, attr, tensor, injected.get((id(module), attr))):
                    return f"peft's load creates {attr!r} in a module"
                continue
            probe = probes[key]
            if tensor.shape != probe.shape or tensor.stride() != probe.stride():
                return f"peft reshapes {key!r}"
            unit = _unit_of(names.get(id(module), {None}), units)
            if unit is None or unit_of.setdefault(key, unit) != unit:
                return f"{key!r} is shared, not one merge unit's"
            if (id(module), attr) not in injected:
                return f"{key!r} fills a tensor peft did not inject"
            held, data = injected[id(module), attr]
            if id(held) in base_ids:
                return "the file holds base tensors"
            if places[id(held)] > 1:  # peft's load copies into it, changing every holder; a swap would not
                return f"{key!r} fills a tensor held in several places"
            entry = found.setdefault(key, FileTensor(key, stored[key], data.dtype, tuple(probe.shape), []))
            if entry.dtype != data.dtype:
                return f"{key!r} fills tensors of different dtypes"
            entry.owners.append((module, attr))
    if set(found) != set(probes):
        return "peft converts some file tensors into new ones"
    by_unit: dict[str, list[FileTensor]] = {}
    for key, entry in found.items():
        by_unit.setdefault(unit_of[key], []).append(entry)
        hollow = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        for module, attr in entry.owners:
            swap_tensor(module, attr, hollow)
    return LazyAdapter(path, by_unit)


def _restore(module, attr: str, tensor, before) -> bool:
    """Undo what the probe load did to a tensor the file does not fill: with `low_cpu_mem_usage`
    peft moves every loaded adapter to its base layer's dtype (AdaLoRA's fp32 `ranknum` became bf16
    on a bf16 base), which its eager load never does. False for a tensor that was not there."""
    if before is None:
        return False
    old, data = before
    if tensor is not old:
        swap_tensor(module, attr, old)
    if old.dtype != data.dtype or old.data_ptr() != data.data_ptr():
        old.data = data
    return True


def _unit_of(names: set[str | None], units: list[str]) -> str | None:
    """The one merge unit a module with these paths in the base model lies in (None: none, or several)."""
    found = set()
    for name in names:
        inside = [u for u in units if name is not None and (name == u or name.startswith(u + "."))]
        found.add(max(inside, key=len) if inside else None)
    return found.pop() if len(found) == 1 else None
