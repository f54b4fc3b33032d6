"""Adapter folders read and checked before the model is touched: config, name, refusal rules, tensors.

The tensors are read last, once every adapter's folder, config and name passed, so a refused
adapter costs no tensor read. `check_adapter_configs` is the static part (adapter_config.json
only), run by the adapter_load stage before any weight is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from qfinal.adapters.peft_types import adapter_refusal, known_peft_types, quant_met
from qfinal.errors import CheckpointError, ConfigError, SourceError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterSpec:
    path: str
    name: str | None = None
    merge: bool = False
    scale: float = 1.0


@dataclass
class Prepared:
    """One adapter, checked: its folder, the name peft will key it by, its config and file tensors."""

    spec: AdapterSpec
    folder: Path
    name: str
    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def prepare_all(
    specs: Sequence[AdapterSpec],
    allow_pickle: bool,
    *,
    quant: str | None = None,
    requantize: bool = False,
    read: bool = True,
) -> list[Prepared]:
    """Every spec checked (unique names, what peft can do with it on a `quant` base), then its tensors
    read; with `read=False` a safetensors file is only found (its reader reads it), a pickle still read."""
    prepared: list[Prepared] = []
    taken: set[str] = set()
    for spec in specs:
        prep = _prepare(spec)
        if spec.name is None:
            base, n = prep.name, 2
            while prep.name in taken:
                prep.name = f"{base}_{n}"
                n += 1
        elif prep.name in taken:
            raise ConfigError(
                f"adapter name '{prep.name}' is used twice", where=str(spec.path), hint="give each adapter its own name"
            )
        taken.add(prep.name)
        prepared.append(prep)
    quant = quant_met(quant, [p.spec.merge for p in prepared], requantize)
    for prep in prepared:
        error = adapter_refusal(
            prep.config,
            name=prep.name,
            where=str(prep.spec.path),
            merge=prep.spec.merge,
            quant=quant,
            requantize=requantize,
        )
        if error is not None:
            raise error
    unmerged = {p.config["peft_type"] for p in prepared if not p.spec.merge}
    if len(unmerged) > 1:
        raise ConfigError(
            f"unmerged adapters of different peft types cannot share a model: {sorted(unmerged)}",
            hint="merge some of them, or load one type",
        )
    for prep in prepared:  # only now, every input checked: the tensors
        if read or not (prep.folder / SAFETENSORS_NAME).is_file():
            prep.tensors = read_tensors(prep.folder, prep.spec, allow_pickle)
    return prepared


def check_adapter_configs(adapters, *, quant: str | None, requantize: bool) -> None:
    """Static check (no weights read): raise the first refusal among `adapters` (objects with
    path, name, merge). A folder or config that cannot be read is left to `apply_adapters` to report."""
    quant = quant_met(quant, [a.merge for a in adapters], requantize)
    for spec in adapters:
        folder = Path(spec.path).expanduser()
        try:
            config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        if not isinstance(peft_type, str) or peft_type not in known_peft_types():
            continue
        name = spec.name or name_for(AdapterSpec(path=spec.path), folder)
        error = adapter_refusal(
            config, name=name, where=str(spec.path), merge=spec.merge, quant=quant, requantize=requantize
        )
        if error is not None:
            raise error


def _prepare(spec: AdapterSpec) -> Prepared:
    """The adapter's folder, name and config, checked; its tensors are read later."""
    folder = Path(spec.path).expanduser()
    if not folder.exists():
        raise SourceError(
            "adapter folder does not exist",
            where=str(spec.path),
            hint="adapters are local PEFT folders (adapter_config.json + adapter_model.safetensors)",
        )
    if not folder.is_dir():
        raise SourceError(
            "adapter path is not a folder",
            where=str(spec.path),
            hint="point at the PEFT folder that holds adapter_config.json",
        )
    config = _read_config(folder, spec)
    if spec.scale != 1.0:
        if config["peft_type"] != "LORA":
            raise ConfigError(
                f"scale works for LoRA adapters only; this one is {config['peft_type']}",
                where=str(spec.path),
                hint="drop scale for this adapter",
            )
        if not math.isfinite(spec.scale):
            raise ConfigError(f"scale must be a finite number, got {spec.scale}", where=str(spec.path))
    return Prepared(spec=spec, folder=folder, name=name_for(spec, folder), config=config)


def _read_config(folder: Path, spec: AdapterSpec) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise SourceError(
            f"no {CONFIG_NAME} in the adapter folder",
            where=str(spec.path),
            hint="a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise CheckpointError(f"{CONFIG_NAME} is not valid JSON ({exc})", where=str(config_path)) from None
    except RecursionError:
        raise CheckpointError(f"{CONFIG_NAME} is nested too deeply", where=str(config_path)) from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise CheckpointError(
            f"{CONFIG_NAME} has no peft_type", where=str(config_path), hint="is this a PEFT adapter folder?"
        )
    if config["peft_type"] not in known_peft_types():
        raise CheckpointError(
            f"unknown peft_type '{config['peft_type']}' for this peft version", where=str(config_path)
        )
    _check_field_types(config, config_path)
    return config


def _check_field_types(config: dict, config_path: Path) -> None:
    """The fields qfinal reads itself (coverage, the report) must have peft's types."""
    for key in ("target_modules", "exclude_modules"):  # a regex, or a list of names
        value = config.get(key)
        if not (value is None or isinstance(value, str) or _names(value)):
            raise CheckpointError(
                f"{key} must be a regex or a list of module names, not {type(value).__name__}",
                where=str(config_path),
            )
    for key in ("task_type", "base_model_name_or_path"):
        if not isinstance(config.get(key), (str, type(None))):
            raise CheckpointError(f"{key} must be a string, not {type(config[key]).__name__}", where=str(config_path))


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_tensors(folder: Path, spec: AdapterSpec, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The adapter file's tensors: safetensors, or (only with `allow_pickle`) a weights-only pickle."""
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as exc:  # SafetensorError, OSError: a malformed or truncated file
            raise CheckpointError(f"cannot read {SAFETENSORS_NAME} ({exc})", where=str(st)) from None
    pkl = folder / PICKLE_NAME
    if pkl.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{PICKLE_NAME} is a pickle, which can run arbitrary code when loaded; refused",
                where=str(pkl),
                hint="pass --allow-pickle to load it with torch.load(weights_only=True), "
                "or convert it to safetensors in a trusted environment",
            )
        try:
            data = torch.load(str(pkl), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {PICKLE_NAME} ({exc})", where=str(pkl)) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{PICKLE_NAME} is not a state dict of tensors", where=str(pkl))
        return data
    raise SourceError(
        f"no {SAFETENSORS_NAME} in the adapter folder",
        where=str(spec.path),
        hint="save the adapter with save_pretrained (safetensors is the default)",
    )


def name_for(spec: AdapterSpec, folder: Path) -> str:
    """The explicit name, checked; else the folder name with anything but [A-Za-z0-9_-] made '_'."""
    if spec.name is not None:
        problem = _name_problem(spec.name)
        if problem:
            raise ConfigError(
                f"adapter name '{spec.name}' {problem}", where=str(spec.path), hint="use letters, digits, '_' and '-'"
            )
        return spec.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.resolve().name).strip("_") or "adapter"
    if _name_problem(name):
        name = f"adapter_{name}"
    return name


def _name_problem(name: str) -> str | None:
    # peft keys each adapter by name in nn.ModuleDicts (lora_A[name]): no '.', no ModuleDict attribute
    if not name or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return "may only hold letters, digits, '_' and '-' (peft puts adapter names in module paths)"
    if hasattr(torch.nn.ModuleDict(), name):
        return "clashes with a torch.nn.ModuleDict attribute (peft stores adapters in ModuleDicts)"
    return None
