"""Coverage: which adapter tensors really landed on the base, which targets matched nothing.

What peft reports natively (peft 0.21):
- `PeftModel.from_pretrained` returns the model only. It *warns* about missing adapter keys (injected
  LoRA tensors absent from the file) and drops the `load_result`; nothing about unused file keys.
- `PeftModel.load_adapter` returns torch's `_IncompatibleKeys`: `missing_keys` filtered to the
  adapter, `unexpected_keys` = file keys (after peft's remapping) that no parameter took.
- No target matching at all raises `NoMatchingPeftModuleError` (a ValueError) before anything is
  injected; a shape mismatch raises torch's size-mismatch RuntimeError unless
  `ignore_mismatched_sizes=True` (then a warning, and the tensor keeps its initialization).
- Which `target_modules` entry matched nothing is not reported when at least one matched.

What is computed here, the same way for every adapter (first or later): the adapter tensors the
model now holds, in checkpoint-key space (`get_peft_model_state_dict`, the function
`save_pretrained` writes with), are compared name, shape and value with the file. A file tensor is
*matched* when the model holds exactly that tensor (cast to the model's dtype), *unused* otherwise;
an injected adapter tensor that no file tensor filled is *missing* (it keeps its initialization:
zeros for lora_B by default, random with `init_lora_weights=False`). Target patterns are checked one
by one with peft's own `check_target_module_exists` against the base's module names.
"""

from __future__ import annotations

import copy

import torch

from qfinal.adapters.peft_types import injects, known_peft_types, variants, virtual_tokens
from qfinal.adapters.prepare import Prepared
from qfinal.report import AdapterRecord, Finding

COVERAGE = "adapter_coverage"
_SHOWN = 8  # keys named in one finding's message; the record holds all of them


def coverage(peft_model, prep: Prepared) -> tuple[list[str], dict[str, str], list[str]]:
    """(matched file keys, unused file keys -> reason, missing adapter keys) for one adapter."""
    from peft import get_peft_model_state_dict

    held = get_peft_model_state_dict(peft_model, adapter_name=prep.name, save_embedding_layers=False)
    full = None
    matched: list[str] = []
    unused: dict[str, str] = {}
    for key, tensor in prep.tensors.items():
        current = held.get(key)
        if current is None:
            # saved base tensors (embeddings saved with save_embedding_layers) land on the base itself
            if full is None:
                full = peft_model.state_dict()
            current = full.get(key)
        if current is None:
            unused[key] = "no such module in the base"
        elif tuple(current.shape) != tuple(tensor.shape):
            unused[key] = f"shape {list(tensor.shape)} in the adapter, {list(current.shape)} in the model"
        elif not torch.equal(current.detach().cpu(), tensor.to(current.dtype)):
            unused[key] = "not loaded (the model holds other values)"
        else:
            matched.append(key)
    placed = set(matched)
    missing = sorted(k for k in held if k not in placed)
    return matched, unused, missing


def target_list(config: dict) -> list[str]:
    """The config's target_modules and target_parameters, as a sorted list."""
    targets = config.get("target_modules")
    out = [targets] if isinstance(targets, str) else sorted(targets or [])
    return out + sorted(config.get("target_parameters") or [])


def unmatched_targets(prep: Prepared, module_names: list[str], param_names: list[str]) -> list[str]:
    """Each target_modules / target_parameters entry that matches no module (parameter) of the base."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = prep.config
    if not injects(config["peft_type"]):  # adaption prompt's target_modules names an attribute, not a path
        return []
    targets = config.get("target_modules")
    unmatched: list[str] = []
    if targets is not None:
        if isinstance(targets, str):
            patterns = [] if targets.lower() == "all-linear" else [targets]  # all-linear: peft's error says it
        else:
            patterns = sorted(targets)
        try:
            peft_config = known_peft_types()[config["peft_type"]].from_pretrained(str(prep.folder))
        except Exception:  # peft rejects the config: the load will say why
            return []
        for pattern in patterns:
            probe = copy.copy(peft_config)
            probe.target_modules = pattern if isinstance(targets, str) else {pattern}
            probe.target_parameters = None
            if not any(check_target_module_exists(probe, name) for name in module_names):
                unmatched.append(pattern)
    for pattern in sorted(config.get("target_parameters") or []):
        if not any(n == pattern or n.endswith(f".{pattern}") for n in param_names):
            unmatched.append(pattern)
    return unmatched


def targets_anything(prep: Prepared, unmatched: list[str]) -> bool:
    """Whether some target of the adapter matched the base."""
    return not unmatched or set(unmatched) != set(target_list(prep.config))


def record(
    prep: Prepared, *, matched, unused: dict[str, str], unmatched, merged, modules_to_save, wrapped: list[str]
) -> AdapterRecord:
    """The report's record of one adapter: its type, what it adds, and how much of it landed."""
    config = prep.config
    return AdapterRecord(
        name=prep.name,
        path=str(prep.spec.path),
        peft_type=config["peft_type"],
        variants=variants(config),
        wrapped_modules=wrapped,
        virtual_tokens=virtual_tokens(config),
        matched=len(matched),
        unused=sorted(unused),
        unmatched_targets=list(unmatched),
        merged=merged,
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        modules_to_save=sorted(set(modules_to_save or [])),
    )


def wrapped_modules(peft_model, name: str) -> list[str]:
    """The base modules that hold adapter `name` (tuner layers; adaption prompt's attention modules)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for module_name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, BaseTunerLayer):
            holders = [getattr(module, attr, None) for attr in module.adapter_layer_names]
            if any(name in holder for holder in holders if hasattr(holder, "__contains__")):
                out.append(module_name)
        elif getattr(module, "adaption_prompt", None) is not None and peft_model.active_adapter == name:
            out.append(module_name)
    return out


def coverage_findings(record: AdapterRecord, reasons: dict[str, str], missing: list[str]) -> list[Finding]:
    """Errors for unmatched targets, unused file tensors and uninitialized adapter tensors; else one info."""
    out: list[Finding] = []
    total = record.matched + len(record.unused)
    if record.unmatched_targets:
        out.append(
            Finding(
                check=COVERAGE,
                severity="error",
                key=record.name,
                message=f"adapter '{record.name}': target(s) that match no module of the base: "
                f"{', '.join(record.unmatched_targets)}",
            )
        )
    if record.unused:
        by_reason: dict[str, list[str]] = {}
        for key in record.unused:
            by_reason.setdefault(reasons.get(key, "not placed"), []).append(key)
        detail = "; ".join(f"{reason}: {_some(keys)}" for reason, keys in by_reason.items())
        out.append(
            Finding(
                check=COVERAGE,
                severity="error",
                key=record.name,
                message=f"adapter '{record.name}': {len(record.unused)} of {total} tensor(s) unused — {detail}",
            )
        )
    if missing:
        out.append(
            Finding(
                check=COVERAGE,
                severity="error",
                key=record.name,
                message=f"adapter '{record.name}': {len(missing)} injected adapter tensor(s) "
                f"not in the file keep their initialization: {_some(missing)}",
            )
        )
    if not out:
        out.append(
            Finding(
                check=COVERAGE,
                severity="info",
                key=record.name,
                message=f"adapter '{record.name}': all {total} tensor(s) placed",
            )
        )
    return out


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
