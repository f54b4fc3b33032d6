"""PEFT adapters on a finalized base, with coverage: which adapter tensors really landed on the base.

The common silent failure with adapters is a key mismatch (another architecture, another naming, a
head for another task, a renamed base): peft injects LoRA layers where `target_modules` match, loads
the adapter file with `load_state_dict(strict=False)` and skips what it cannot place. The user ships
the base believing it is fine-tuned. `apply_adapters` loads each adapter with peft's own API (so the
outputs are peft's, bit for bit) and then accounts for every tensor of the adapter file.

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

Merging (`AdapterSpec.merge`): merged adapters are applied first, in order, each with
`merge_and_unload()`; unmerged adapters are loaded afterwards (LoRA deltas add, so the order does not
change the function, only float rounding). On a plain base this is exactly peft's result. On a
bitsandbytes base:
- default: the whole base is dequantized first (transformers `model.dequantize()`, to the model's
  dtype), then peft merges in float: merged weight = dequant(W) + ΔW exactly; the model is no longer
  quantized. Its outputs differ from the fp32 reference (fp32 base + merged adapter) by the 4-bit
  quantization error of the base only.
- `requantize=True`: peft's bnb merge (dequantize, add ΔW, quantize again to the same 4-bit / int8
  format): the merged weights carry a second rounding, of W + ΔW.
bitsandbytes >= 0.48 on CPUs with AVX512-BF16 repacks 4-bit weights on the first forward pass, after
which `dequantize_4bit` (used by peft's merge and transformers' dequantize) returns wrong values; the
packing is undone here before any merge.

`scale` multiplies the adapter's LoRA scaling (alpha / r) with peft's public `LoraLayer.set_scale`;
the adapter's `lora_alpha` (and `alpha_pattern`) in its config is multiplied too, so a saved
unmerged adapter keeps the scale (bit-identical: `scale * alpha / r == (alpha * scale) / r`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from qfinal.errors import CheckpointError, ConfigError, SourceError
from qfinal.report import AdapterRecord, Finding

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

COVERAGE = "adapter_coverage"
BASE = "adapter_base"
MERGE = "adapter_merge"
LOAD = "adapter_load"
SCALE = "adapter_scale"

_SHOWN = 8  # keys named in one finding's message; the record holds all of them

# peft task type -> transformers auto-mapping names / class-name suffixes that fit it
_TASK_MAPPINGS = {
    "CAUSAL_LM": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
    "SEQ_2_SEQ_LM": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",),
    "SEQ_CLS": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",),
    "TOKEN_CLS": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",),
    "QUESTION_ANS": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",),
    "FEATURE_EXTRACTION": ("MODEL_MAPPING_NAMES",),
}
_TASK_SUFFIXES = {
    "CAUSAL_LM": ("ForCausalLM", "LMHeadModel"),
    "SEQ_2_SEQ_LM": ("ForConditionalGeneration", "ForSeq2SeqLM"),
    "SEQ_CLS": ("ForSequenceClassification",),
    "TOKEN_CLS": ("ForTokenClassification",),
    "QUESTION_ANS": ("ForQuestionAnswering",),
    "FEATURE_EXTRACTION": (),
}
# peft warnings that the coverage findings already say, more precisely
_COVERED_WARNINGS = ("Found missing adapter keys", "Some weights of")


@dataclass(frozen=True)
class AdapterSpec:
    path: str
    name: str | None = None
    merge: bool = False
    scale: float = 1.0


@dataclass
class _Prepared:
    spec: AdapterSpec
    folder: Path
    name: str
    config: dict
    tensors: dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def apply_adapters(model, specs: Sequence[AdapterSpec], *, requantize: bool = False,
                   allow_pickle: bool = False) -> tuple[Any, list[AdapterRecord], list[Finding]]:
    """Load `specs` onto `model` (modified in place) and account for every adapter tensor.

    Returns the model to use afterwards (a `PeftModel` when an unmerged adapter was loaded; the
    base, with merged adapters folded in, otherwise), one record per spec in spec order, and the
    findings. Every input is checked before the model is touched; bad input raises a QfinalError.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ConfigError("apply_adapters expects a transformers model, got a PeftModel",
                          hint="pass the base model (peft_model.get_base_model())")
    prepared = _prepare_all(specs, allow_pickle)
    module_names = [n for n, _ in model.named_modules() if n]
    param_names = [n for n, _ in model.named_parameters()]
    records: dict[int, AdapterRecord] = {}
    findings: list[Finding] = []
    state = {"model": model, "peft_model": None, "dequantized": False}

    order = [i for i, p in enumerate(prepared) if p.spec.merge] + \
            [i for i, p in enumerate(prepared) if not p.spec.merge]
    for i in order:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records[i] = _apply_one(state, prepared[i], module_names, param_names, requantize, findings)
        _forward_warnings(caught, findings, prepared[i].name)

    model, peft_model = state["model"], state["peft_model"]
    if peft_model is not None:
        names = [n for n in peft_model.peft_config if n != peft_model.active_adapter]
        if names:
            findings.append(Finding(
                check=LOAD, severity="info",
                message=f"active adapter: '{peft_model.active_adapter}'; loaded inactive: "
                        f"{', '.join(repr(n) for n in names)} (peft keeps one adapter active; "
                        "switch with set_adapter)"))
        model = peft_model
    return model, [records[i] for i in range(len(prepared))], findings


def _apply_one(state: dict, prep: _Prepared, module_names: list[str], param_names: list[str],
               requantize: bool, findings: list[Finding]) -> AdapterRecord:
    merge = prep.spec.merge
    model = state["model"]
    unmatched = _unmatched_targets(prep, module_names, param_names)
    quant = _quantization(model) if merge else None
    if merge and quant and _targets_anything(prep, unmatched):
        _unpack_bnb_cpu(model)
        if not requantize and not state["dequantized"]:
            model = state["model"] = _dequantize(model, quant, prep)
            state["dequantized"] = True
            findings.append(Finding(
                check=MERGE, severity="info", key=prep.name,
                message=f"base dequantized from {quant} to {_dtype_name(model)} to merge '{prep.name}' "
                        f"(merged weight = dequant(W) + ΔW, exact in {_dtype_name(model)}); the model is "
                        "no longer quantized — set merge_requantize to quantize the merged weights again"))
            quant = None
    loaded = _load(model, None if merge else state["peft_model"], prep)
    if loaded is None:  # no target matched anything: peft injected nothing
        reasons = dict.fromkeys(prep.tensors, "no target module matched in the base")
        record = _record(prep, matched=[], unused=reasons, unmatched=unmatched or _target_list(prep.config),
                         merged=False, modules_to_save=prep.config.get("modules_to_save"))
        findings += _coverage_findings(record, reasons, missing=[])
        findings += _base_findings(model, prep)
        return record
    if not merge and state["peft_model"] is None:
        state["peft_model"] = loaded
    matched, reasons, missing = _coverage(loaded, prep)
    if prep.spec.scale != 1.0:
        _apply_scale(loaded, prep, findings)
    record = _record(prep, matched=matched, unused=reasons, unmatched=unmatched, merged=merge,
                     modules_to_save=getattr(loaded.peft_config[prep.name], "modules_to_save", None))
    findings += _coverage_findings(record, reasons, missing)
    findings += _base_findings(loaded.get_base_model(), prep)
    if merge:
        state["model"] = loaded.merge_and_unload()
        how = (f"into {quant} weights by peft (dequantize, add ΔW, quantize again: the merged weights "
               "carry a second rounding)" if quant
               else f"into {_dtype_name(state['model'])} weights (peft merge_and_unload)")
        findings.append(Finding(check=MERGE, severity="info", key=prep.name,
                                message=f"adapter '{prep.name}' merged {how}"))
    return record


# --------------------------------------------------------------------------------------------
# input checks (nothing touches the model here)
# --------------------------------------------------------------------------------------------


def _prepare_all(specs: Sequence[AdapterSpec], allow_pickle: bool) -> list[_Prepared]:
    prepared: list[_Prepared] = []
    taken: set[str] = set()
    for spec in specs:
        prep = _prepare(spec, allow_pickle)
        if spec.name is None:
            base, n = prep.name, 2
            while prep.name in taken:
                prep.name = f"{base}_{n}"
                n += 1
        elif prep.name in taken:
            raise ConfigError(f"adapter name '{prep.name}' is used twice", where=str(spec.path),
                              hint="give each adapter its own name")
        taken.add(prep.name)
        prepared.append(prep)
    unmerged = {p.config["peft_type"] for p in prepared if not p.spec.merge}
    if len(unmerged) > 1:
        raise ConfigError(f"unmerged adapters of different peft types cannot share a model: {sorted(unmerged)}",
                          hint="merge some of them, or load one type")
    return prepared


def _prepare(spec: AdapterSpec, allow_pickle: bool) -> _Prepared:
    folder = Path(spec.path).expanduser()
    if not folder.exists():
        raise SourceError("adapter folder does not exist", where=str(spec.path),
                          hint="adapters are local PEFT folders (adapter_config.json + adapter_model.safetensors)")
    if not folder.is_dir():
        raise SourceError("adapter path is not a folder", where=str(spec.path),
                          hint="point at the PEFT folder that holds adapter_config.json")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise SourceError(f"no {CONFIG_NAME} in the adapter folder", where=str(spec.path),
                          hint="a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{CONFIG_NAME} is not valid JSON ({exc})", where=str(config_path)) from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise CheckpointError(f"{CONFIG_NAME} has no peft_type", where=str(config_path),
                              hint="is this a PEFT adapter folder?")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if config["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise CheckpointError(f"unknown peft_type '{config['peft_type']}' for this peft version",
                              where=str(config_path))
    if spec.scale != 1.0:
        if config["peft_type"] != "LORA":
            raise ConfigError(f"scale works for LoRA adapters only; this one is {config['peft_type']}",
                              where=str(spec.path), hint="drop scale for this adapter")
        if not math.isfinite(spec.scale):
            raise ConfigError(f"scale must be a finite number, got {spec.scale}", where=str(spec.path))
    tensors = _read_tensors(folder, spec, allow_pickle)
    name = _name_for(spec, folder)
    return _Prepared(spec=spec, folder=folder, name=name, config=config, tensors=tensors)


def _read_tensors(folder: Path, spec: AdapterSpec, allow_pickle: bool) -> dict[str, torch.Tensor]:
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
            raise CheckpointError(f"{PICKLE_NAME} is a pickle, which can run arbitrary code when loaded; refused",
                                  where=str(pkl),
                                  hint="pass --allow-pickle to load it with torch.load(weights_only=True), "
                                       "or convert it to safetensors in a trusted environment")
        try:
            data = torch.load(str(pkl), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {PICKLE_NAME} ({exc})", where=str(pkl)) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{PICKLE_NAME} is not a state dict of tensors", where=str(pkl))
        return data
    raise SourceError(f"no {SAFETENSORS_NAME} in the adapter folder", where=str(spec.path),
                      hint="save the adapter with save_pretrained (safetensors is the default)")


def _name_for(spec: AdapterSpec, folder: Path) -> str:
    """The explicit name, checked; else the folder name with anything but [A-Za-z0-9_-] made '_'."""
    if spec.name is not None:
        problem = _name_problem(spec.name)
        if problem:
            raise ConfigError(f"adapter name '{spec.name}' {problem}", where=str(spec.path),
                              hint="use letters, digits, '_' and '-'")
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


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _load(model, host, prep: _Prepared):
    """`PeftModel.from_pretrained` for the first adapter on `model`, `host.load_adapter` for later ones.

    Returns the PeftModel holding the adapter, or None when no target matched (peft's
    NoMatchingPeftModuleError; nothing was injected). `ignore_mismatched_sizes` turns a shape
    mismatch into a skipped tensor (reported by coverage) instead of a crash; it changes nothing
    when the shapes fit.
    """
    from peft import PeftModel

    try:
        if host is None:
            return PeftModel.from_pretrained(model, str(prep.folder), adapter_name=prep.name,
                                             ignore_mismatched_sizes=True)
        host.load_adapter(str(prep.folder), adapter_name=prep.name, ignore_mismatched_sizes=True)
        return host
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        if _no_target_matched(exc):
            return None
        raise CheckpointError(f"peft could not load the adapter: {exc}", where=str(prep.spec.path),
                              hint="is it an adapter for this model?") from None


def _no_target_matched(exc: Exception) -> bool:
    try:
        from peft.utils import NoMatchingPeftModuleError  # peft >= 0.16
    except ImportError:
        NoMatchingPeftModuleError = ()  # noqa: N806
    if isinstance(exc, NoMatchingPeftModuleError):
        return True
    text = str(exc)
    return isinstance(exc, ValueError) and ("not found in the base model" in text
                                            or "No modules were targeted" in text)


def _apply_scale(peft_model, prep: _Prepared, findings: list[Finding]) -> None:
    from peft.tuners.lora import LoraLayer

    scale = prep.spec.scale
    layers = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and prep.name in module.scaling:
            module.set_scale(prep.name, scale)
            layers += 1
    cfg = peft_model.peft_config[prep.name]
    cfg.lora_alpha = cfg.lora_alpha * scale
    if getattr(cfg, "alpha_pattern", None):
        cfg.alpha_pattern = {k: v * scale for k, v in cfg.alpha_pattern.items()}
    findings.append(Finding(check=SCALE, severity="info", key=prep.name,
                            message=f"adapter '{prep.name}' scaled by {scale:g} on {layers} LoRA layer(s) "
                                    "(LoraLayer.set_scale; lora_alpha in its config scaled to match)"))


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------


def _coverage(peft_model, prep: _Prepared) -> tuple[list[str], dict[str, str], list[str]]:
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


def _target_list(config: dict) -> list[str]:
    targets = config.get("target_modules")
    out = [targets] if isinstance(targets, str) else sorted(targets or [])
    return out + sorted(config.get("target_parameters") or [])


def _unmatched_targets(prep: _Prepared, module_names: list[str], param_names: list[str]) -> list[str]:
    """Each target_modules / target_parameters entry that matches no module (parameter) of the base."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = prep.config
    targets = config.get("target_modules")
    unmatched: list[str] = []
    if targets is not None:
        if isinstance(targets, str):
            patterns = [] if targets.lower() == "all-linear" else [targets]  # all-linear: peft's error says it
        else:
            patterns = sorted(targets)
        try:
            peft_config = _peft_config(prep)
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


def _targets_anything(prep: _Prepared, unmatched: list[str]) -> bool:
    return not unmatched or set(unmatched) != set(_target_list(prep.config))


def _peft_config(prep: _Prepared):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[prep.config["peft_type"]].from_pretrained(str(prep.folder))


def _record(prep: _Prepared, *, matched, unused: dict[str, str], unmatched, merged, modules_to_save) -> AdapterRecord:
    record = AdapterRecord(
        name=prep.name, path=str(prep.spec.path), matched=len(matched), unused=sorted(unused),
        unmatched_targets=list(unmatched), merged=merged, task_type=prep.config.get("task_type"),
        base_model_name_or_path=prep.config.get("base_model_name_or_path"),
        modules_to_save=sorted(set(modules_to_save or [])))
    return record


def _coverage_findings(record: AdapterRecord, reasons: dict[str, str], missing: list[str]) -> list[Finding]:
    out: list[Finding] = []
    total = record.matched + len(record.unused)
    if record.unmatched_targets:
        out.append(Finding(check=COVERAGE, severity="error", key=record.name,
                           message=f"adapter '{record.name}': target(s) that match no module of the base: "
                                   f"{', '.join(record.unmatched_targets)}"))
    if record.unused:
        by_reason: dict[str, list[str]] = {}
        for key in record.unused:
            by_reason.setdefault(reasons.get(key, "not placed"), []).append(key)
        detail = "; ".join(f"{reason}: {_some(keys)}" for reason, keys in by_reason.items())
        out.append(Finding(check=COVERAGE, severity="error", key=record.name,
                           message=f"adapter '{record.name}': {len(record.unused)} of {total} tensor(s) "
                                   f"unused — {detail}"))
    if missing:
        out.append(Finding(check=COVERAGE, severity="error", key=record.name,
                           message=f"adapter '{record.name}': {len(missing)} injected adapter tensor(s) "
                                   f"not in the file keep their initialization: {_some(missing)}"))
    if not out:
        out.append(Finding(check=COVERAGE, severity="info", key=record.name,
                           message=f"adapter '{record.name}': all {total} tensor(s) placed"))
    return out


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


# --------------------------------------------------------------------------------------------
# base / task checks
# --------------------------------------------------------------------------------------------


def _base_findings(model, prep: _Prepared) -> list[Finding]:
    out: list[Finding] = []
    hf_config = getattr(model, "config", None)
    cls_name = type(model).__name__
    task = prep.config.get("task_type")
    if task and not _task_fits(task, cls_name):
        out.append(Finding(check=BASE, severity="warning", key=prep.name,
                           message=f"adapter '{prep.name}' was trained for task {task}; the base is a {cls_name}"))
    adapter_base = prep.config.get("base_model_name_or_path")
    base_name = (getattr(hf_config, "_name_or_path", None) or getattr(model, "name_or_path", None) or "") \
        if hf_config is not None else ""
    if not adapter_base or hf_config is None:
        return out
    trained_on = _local_config(adapter_base)
    if trained_on is not None:
        diffs = []
        for field in ("model_type", "architectures", "hidden_size", "intermediate_size",
                      "num_hidden_layers"):
            theirs, ours = trained_on.get(field), getattr(hf_config, field, None)
            if theirs is not None and ours is not None and theirs != ours:
                diffs.append(f"{field} {theirs} vs {ours}")
        if diffs:
            out.append(Finding(check=BASE, severity="warning", key=prep.name,
                               message=f"adapter '{prep.name}' was trained on {adapter_base}, which differs "
                                       f"from this base: {'; '.join(diffs)}"))
        return out
    if base_name and not _same_name(adapter_base, base_name):
        out.append(Finding(check=BASE, severity="warning", key=prep.name,
                           message=f"adapter '{prep.name}' was trained on {adapter_base}; the base is "
                                   f"{base_name} (could not compare their configs)"))
    return out


def _task_fits(task: str, cls_name: str) -> bool:
    if task not in _TASK_MAPPINGS:
        return True
    from transformers.models.auto import modeling_auto

    def names(mapping_name: str) -> set[str]:
        out: set[str] = set()
        for value in getattr(modeling_auto, mapping_name, {}).values():
            out.update(value if isinstance(value, (list, tuple)) else [value])
        return out

    if any(cls_name in names(m) for m in _TASK_MAPPINGS[task]):
        return True
    return bool(_TASK_SUFFIXES[task]) and cls_name.endswith(_TASK_SUFFIXES[task])


def _local_config(name_or_path: str) -> dict | None:
    path = Path(name_or_path).expanduser() / "config.json"
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    return None


def _same_name(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
            return True
    except OSError:
        pass
    return a.rstrip("/").rsplit("/", 1)[-1].lower() == b.rstrip("/").rsplit("/", 1)[-1].lower()


# --------------------------------------------------------------------------------------------
# quantized bases
# --------------------------------------------------------------------------------------------


def _quantization(model) -> str | None:
    """'nf4' / 'fp4' / 'int8' for a bitsandbytes base, the quant method for another quantizer, else None."""
    for param in model.parameters():
        kind = type(param).__name__
        if kind == "Params4bit":
            return getattr(getattr(param, "quant_state", None), "quant_type", None) or "4-bit"
        if kind == "Int8Params":
            return "int8"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None or getattr(model, "is_quantized", False):
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        return str(getattr(method, "value", method) or "quantized")
    return None


def _unpack_bnb_cpu(model) -> None:
    """Undo bitsandbytes' CPU weight packing (made on the first eval forward on AVX512-BF16 CPUs).

    Packed 4-bit weights dequantize wrongly through `dequantize_4bit`; bitsandbytes itself unpacks
    them before saving (`Linear4bit._save_to_state_dict`) and before moving to a GPU. This does the same.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as inverse
    except ImportError:  # a bitsandbytes without CPU packing, or a new name: fall back to the save path
        inverse = None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        if inverse is not None:
            weight.data, weight.quant_state = inverse(weight.data, state)
        else:
            module.state_dict()  # Linear4bit._save_to_state_dict unpacks in place


def _dequantize(model, quant: str, prep: _Prepared):
    try:
        result = model.dequantize()
    except (ValueError, NotImplementedError, AttributeError, RuntimeError) as exc:
        raise ConfigError(f"cannot dequantize the {quant} base to merge adapter '{prep.name}' ({exc})",
                          where=str(prep.spec.path),
                          hint="set merge_requantize to merge into the quantized weights, or load it unmerged")
    return result if result is not None else model


def _dtype_name(model) -> str:
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "float"


# --------------------------------------------------------------------------------------------
# warnings
# --------------------------------------------------------------------------------------------


def _forward_warnings(caught, findings: list[Finding], name: str) -> None:
    """peft's warnings become info findings (deduplicated); other warnings are re-emitted."""
    seen = {f.message for f in findings}
    for w in caught:
        text = str(w.message)
        if "/peft/" in str(w.filename).replace("\\", "/"):
            if text.startswith(_COVERED_WARNINGS):
                continue
            message = f"peft: {text[:400]}"
            if message not in seen:
                seen.add(message)
                findings.append(Finding(check=LOAD, severity="info", key=name, message=message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
