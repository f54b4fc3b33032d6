"""The torch and peft internals the streaming merge (`adapters.deltas`) needs, in one place.

torch: a module's own tensors are swapped in and out of `_parameters` / `_buffers` (a real tensor
put in for one merge, the hollow one put back), which no public API does without copying.
peft: `BaseTuner._check_merge_allowed`, the check `merge_and_unload` makes before merging.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def own_tensors(module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the module's own parameters and buffers (not its children's)."""
    for store in (module._parameters, module._buffers):
        for name, tensor in list(store.items()):
            if tensor is not None:
                yield name, tensor


def swap_tensor(module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put `value` in as the module's parameter or buffer `name` (a Parameter, without grad, where
    a Parameter was); return what was there."""
    store = module._parameters if name in module._parameters else module._buffers
    old = store[name]
    if isinstance(old, torch.nn.Parameter) and not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    store[name] = value
    return old


def check_merge_allowed(peft_model) -> None:
    """peft's own refusal to merge (a ValueError), as `merge_and_unload` raises it."""
    peft_model.base_model._check_merge_allowed()
