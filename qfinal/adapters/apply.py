"""PEFT adapters on a finalized base, with coverage: which adapter tensors really landed on the base.

The common silent failure with adapters is a key mismatch (another architecture, another naming, a
head for another task, a renamed base): peft injects LoRA layers where `target_modules` match, loads
the adapter file with `load_state_dict(strict=False)` and skips what it cannot place. The user ships
the base believing it is fine-tuned. `apply_adapters` loads each adapter with peft's own API (so the
outputs are peft's, bit for bit, for every peft type) and then accounts for every tensor of the
adapter file (`coverage`). Inputs are read and checked first (`prepare`), merges go through `merge`.

`scale` multiplies the adapter's LoRA scaling (alpha / r) with peft's public `LoraLayer.set_scale`;
the adapter's `lora_alpha` (and `alpha_pattern`) in its config is multiplied too, so a saved
unmerged adapter keeps the scale (bit-identical: `scale * alpha / r == (alpha * scale) / r`).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from qfinal.adapters.coverage import (
    coverage,
    coverage_findings,
    record,
    target_list,
    targets_anything,
    unmatched_targets,
    wrapped_modules,
)
from qfinal.adapters.fit import base_findings
from qfinal.adapters.merge import merge, quantization, ready_to_merge
from qfinal.adapters.peft_model import is_peft_model
from qfinal.adapters.prepare import AdapterSpec, Prepared, prepare_all
from qfinal.errors import CheckpointError, ConfigError
from qfinal.report import AdapterRecord, Finding

LOAD = "adapter_load"
SCALE = "adapter_scale"
# peft warnings that the coverage findings already say, more precisely
_COVERED_WARNINGS = ("Found missing adapter keys", "Some weights of")


def apply_adapters(
    model, specs: Sequence[AdapterSpec], *, requantize: bool = False, allow_pickle: bool = False
) -> tuple[Any, list[AdapterRecord], list[Finding]]:
    """Load `specs` onto `model` (modified in place) and account for every adapter tensor.

    Returns the model to use afterwards (a `PeftModel` when an unmerged adapter was loaded; the
    base, with merged adapters folded in, otherwise), one record per spec in spec order, and the
    findings. Every input is checked before the model is touched; bad input raises a QfinalError.
    """
    if is_peft_model(model):
        raise ConfigError(
            "apply_adapters expects a transformers model, got a PeftModel",
            hint="pass the base model (peft_model.get_base_model())",
        )
    prepared = prepare_all(specs, allow_pickle, quant=quantization(model), requantize=requantize)
    module_names = [n for n, _ in model.named_modules() if n]
    param_names = [n for n, _ in model.named_parameters()]
    records: dict[int, AdapterRecord] = {}
    findings: list[Finding] = []
    state = {"model": model, "peft_model": None, "dequantized": False}

    order = [i for i, p in enumerate(prepared) if p.spec.merge] + [
        i for i, p in enumerate(prepared) if not p.spec.merge
    ]
    for i in order:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records[i] = _apply_one(state, prepared[i], module_names, param_names, requantize, findings)
        _forward_warnings(caught, findings, prepared[i].name)

    model, peft_model = state["model"], state["peft_model"]
    if peft_model is not None:
        names = [n for n in peft_model.peft_config if n != peft_model.active_adapter]
        if names:
            findings.append(
                Finding(
                    check=LOAD,
                    severity="info",
                    message=f"active adapter: '{peft_model.active_adapter}'; loaded inactive: "
                    f"{', '.join(repr(n) for n in names)} (peft keeps one adapter active; "
                    "switch with set_adapter)",
                )
            )
        model = peft_model
    return model, [records[i] for i in range(len(prepared))], findings


def _apply_one(
    state: dict,
    prep: Prepared,
    module_names: list[str],
    param_names: list[str],
    requantize: bool,
    findings: list[Finding],
) -> AdapterRecord:
    merge_it = prep.spec.merge
    unmatched = unmatched_targets(prep, module_names, param_names)
    quant = quantization(state["model"]) if merge_it else None
    if merge_it and quant and targets_anything(prep, unmatched):
        quant = ready_to_merge(state, prep, quant, requantize, findings)
    model = state["model"]
    loaded = _load(model, None if merge_it else state["peft_model"], prep)
    if loaded is None:  # no target matched anything: peft injected nothing
        reasons = dict.fromkeys(prep.tensors, "no target module matched in the base")
        rec = record(
            prep,
            matched=[],
            unused=reasons,
            unmatched=unmatched or target_list(prep.config),
            merged=False,
            modules_to_save=prep.config.get("modules_to_save"),
            wrapped=[],
        )
        findings += coverage_findings(rec, reasons, missing=[])
        findings += base_findings(model, prep)
        return rec
    if not merge_it and state["peft_model"] is None:
        state["peft_model"] = loaded
    matched, reasons, missing = coverage(loaded, prep)
    if prep.spec.scale != 1.0:
        _apply_scale(loaded, prep, findings)
    rec = record(
        prep,
        matched=matched,
        unused=reasons,
        unmatched=unmatched,
        merged=merge_it,
        modules_to_save=getattr(loaded.peft_config[prep.name], "modules_to_save", None),
        wrapped=wrapped_modules(loaded, prep.name),
    )
    findings += coverage_findings(rec, reasons, missing)
    findings += base_findings(loaded.get_base_model(), prep)
    if merge_it:
        state["model"], finding = merge(loaded, prep, quant)
        findings.append(finding)
    return rec


def _load(model, host, prep: Prepared):
    """`PeftModel.from_pretrained` for the first adapter on `model`, `host.load_adapter` for later ones.

    Returns the PeftModel holding the adapter, or None when no target matched (peft's
    NoMatchingPeftModuleError; nothing was injected). `ignore_mismatched_sizes` turns a shape
    mismatch into a skipped tensor (reported by coverage) instead of a crash; it changes nothing
    when the shapes fit.
    """
    from peft import PeftModel

    try:
        if host is None:
            return PeftModel.from_pretrained(
                model, str(prep.folder), adapter_name=prep.name, ignore_mismatched_sizes=True
            )
        host.load_adapter(str(prep.folder), adapter_name=prep.name, ignore_mismatched_sizes=True)
        return host
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        if _no_target_matched(exc):
            return None
        raise CheckpointError(
            f"peft could not load the adapter: {exc}",
            where=str(prep.spec.path),
            hint="is it an adapter for this model?",
        ) from None


def _no_target_matched(exc: Exception) -> bool:
    try:
        from peft.utils import NoMatchingPeftModuleError  # peft >= 0.16
    except ImportError:
        NoMatchingPeftModuleError = ()  # noqa: N806
    if isinstance(exc, NoMatchingPeftModuleError):
        return True
    text = str(exc)
    return isinstance(exc, ValueError) and ("not found in the base model" in text or "No modules were targeted" in text)


def _apply_scale(peft_model, prep: Prepared, findings: list[Finding]) -> None:
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
    findings.append(
        Finding(
            check=SCALE,
            severity="info",
            key=prep.name,
            message=f"adapter '{prep.name}' scaled by {scale:g} on {layers} LoRA layer(s) "
            "(LoraLayer.set_scale; lora_alpha in its config scaled to match)",
        )
    )


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
