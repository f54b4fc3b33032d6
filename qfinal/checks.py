"""The named checks behind `validate`. Names are stable: CI filters, JSON and JUnit use them.

Header checks read only the inventory (safetensors headers + index) and the raw config.json, so
`validate --fast` and the full pipeline share them. Model checks need the finalized model.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from .report import Finding

CHECKS = ("checkpoint_files", "safetensors_header", "index_consistency", "file_confinement", "pickle_refused",
          "missing_keys", "unexpected_keys", "shape_mismatch", "dtype_consistency", "quantization_config",
          "meta_tensors", "tie_audit", "nan_inf", "adapter_coverage")

FULL_MODE_CHECKS = tuple(c for c in CHECKS if c != "adapter_coverage")
FAST_MODE_CHECKS = tuple(c for c in CHECKS if c not in ("nan_inf", "meta_tensors", "adapter_coverage"))

QUANT_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format",
                        ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def is_quant_state_key(key: str) -> bool:
    return key.endswith(QUANT_STATE_SUFFIXES)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], key):
                return True
        elif fnmatch.fnmatchcase(key, pattern):
            return True
    return False


def key_findings(missing, unexpected, mismatched, allow_missing=(), allow_unexpected=()) -> list[Finding]:
    out = []
    for key in sorted(missing):
        allowed = _matches(key, allow_missing)
        out.append(Finding(check="missing_keys", severity="info" if allowed else "error", key=key,
                           message=("allowed by validate.allow_missing" if allowed else
                                    "not in the checkpoint: transformers would initialize it at random")))
    for key in sorted(unexpected):
        allowed = _matches(key, allow_unexpected)
        out.append(Finding(check="unexpected_keys", severity="info" if allowed else "error", key=key,
                           message=("allowed by validate.allow_unexpected" if allowed else
                                    "in the checkpoint but not in the model: it is ignored")))
    for key, ckpt_shape, model_shape in sorted(mismatched):
        out.append(Finding(check="shape_mismatch", severity="error", key=key,
                           message=f"checkpoint shape {list(ckpt_shape)} != model shape {list(model_shape)}"))
    return out


def inventory_findings(inventory) -> list[Finding]:
    return [Finding(check=p.check, severity="error", key=p.key,
                    message=(f"{p.file}: {p.message}" if p.file else p.message)) for p in inventory.problems]


def dtype_findings(raw_config: dict, inventory, keep_fp32: Iterable[str] = ()) -> list[Finding]:
    declared = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if isinstance(declared, dict) or declared is None or declared == "auto":
        return []
    keep_fp32 = tuple(keep_fp32 or ())
    counts: dict[str, int] = {}
    for name, entry in inventory.tensors.items():
        if entry.dtype not in FLOAT_CODES or is_quant_state_key(name):
            continue
        if keep_fp32 and any(k in name for k in keep_fp32):
            continue
        counts[FLOAT_CODES[entry.dtype]] = counts.get(FLOAT_CODES[entry.dtype], 0) + 1
    total = sum(counts.values())
    if not total or counts.get(declared, 0) == total:
        return [Finding(check="dtype_consistency", severity="info",
                        message=f"config dtype {declared} matches {total} floating tensor(s)")]
    found = ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))
    return [Finding(check="dtype_consistency", severity="error", key="config.json:dtype",
                    message=f"config.json says {declared} but the floating tensors are: {found}")]


def quantization_findings(raw_config: dict, inventory) -> list[Finding]:
    qc = raw_config.get("quantization_config")
    keys = inventory.tensors.keys()
    has_4bit = any(k.endswith((".absmax", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"))
                   for k in keys)
    has_8bit = any(k.endswith(".SCB") for k in keys)
    if not inventory.tensors:
        return []
    if qc is None:
        if has_4bit or has_8bit:
            return [Finding(check="quantization_config", severity="error", key="config.json:quantization_config",
                            message="the checkpoint holds bitsandbytes quant state but config.json has no "
                                    "quantization_config: transformers would load packed bytes as weights")]
        return []
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        return [Finding(check="quantization_config", severity="info",
                        message=f"quant_method {qc.get('quant_method') if isinstance(qc, dict) else qc!r} "
                                "is not checked by qfinal")]
    wants_4bit, wants_8bit = bool(qc.get("load_in_4bit")), bool(qc.get("load_in_8bit"))
    problems = []
    if wants_4bit and not has_4bit:
        problems.append("quantization_config says 4-bit but no absmax/quant_state tensors are present")
    if wants_8bit and not has_8bit:
        problems.append("quantization_config says 8-bit but no SCB tensors are present")
    if wants_4bit and has_8bit:
        problems.append("quantization_config says 4-bit but SCB (8-bit) tensors are present")
    if wants_8bit and has_4bit:
        problems.append("quantization_config says 8-bit but 4-bit quant state is present")
    if wants_4bit:
        kind = qc.get("bnb_4bit_quant_type", "fp4")
        other = "fp4" if kind == "nf4" else "nf4"
        if any(k.endswith(f".quant_state.bitsandbytes__{other}") for k in keys):
            problems.append(f"quantization_config says {kind} but {other} quant state is present")
    if problems:
        return [Finding(check="quantization_config", severity="error", key="config.json:quantization_config",
                        message=m) for m in problems]
    return [Finding(check="quantization_config", severity="info", message="quant state matches quantization_config")]


def tie_findings(model, tied, raw_config: dict, inventory, read_tensor=None) -> list[Finding]:
    """Audit every tie the model class declares against the config, the checkpoint and the result."""
    out = []
    config_ties = bool(getattr(model.config, "tie_word_embeddings", False))
    declared = dict(getattr(model, "_tied_weights_keys", None) or {})
    for record in tied:
        target, source = record.target, record.source
        in_ckpt = [k for k in (target, source) if k in inventory.tensors]
        holds = "both keys" if len(in_ckpt) == 2 else (f"only {in_ckpt[0]}" if in_ckpt else "neither key")
        if not record.shared:
            out.append(Finding(check="tie_audit", severity="error", key=target,
                               message=f"config ties {target} <- {source} but they do not share storage "
                                       f"(checkpoint holds {holds})"))
            continue
        if len(in_ckpt) == 2 and read_tensor is not None:
            import torch

            a, b = read_tensor(target), read_tensor(source)
            if a.shape != b.shape or not torch.equal(a, b):
                out.append(Finding(check="tie_audit", severity="error", key=target,
                                   message=f"checkpoint holds different data for {target} and {source}; "
                                           f"tying keeps {source} and silently drops {target}"))
                continue
        out.append(Finding(check="tie_audit", severity="info", key=target,
                           message=f"{target} <- {source} shares storage (checkpoint holds {holds})"))
    if not config_ties:
        for target, source in sorted(declared.items()):
            out.append(Finding(check="tie_audit", severity="info", key=target,
                               message=f"declared tie {target} <- {source} not requested by the config "
                                       "(tie_word_embeddings: false); kept separate"))
    return out


def _offloaded(module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(hook is not None and getattr(hook, "offload", False))


def meta_findings(model, missing: set[str], tied_targets: set[str]) -> list[Finding]:
    out = []
    modules = dict(model.named_modules())
    for kind, items in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in items:
            if tensor is None or tensor.device.type != "meta":
                continue
            owner = modules.get(name.rpartition(".")[0])
            if owner is not None and _offloaded(owner):
                continue
            if name in tied_targets:
                reason = "a tie that did not resolve"
            elif name in missing:
                reason = "the key is missing from the checkpoint"
            elif kind == "buffer" and owner is not None and name.rpartition(".")[2] in owner._non_persistent_buffers_set:
                reason = "a non-persistent buffer that was never materialized"
            else:
                reason = "never loaded"
            out.append(Finding(check="meta_tensors", severity="error", key=name,
                               message=f"{kind} left on the meta device: {reason}"))
    return out


def nan_findings(model) -> list[Finding]:
    import torch

    out = []
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        with torch.no_grad():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor).sum())
                inf = int((~finite).sum()) - nan
                out.append(Finding(check="nan_inf", severity="error", key=name,
                                   message=f"{nan} NaN and {inf} Inf value(s)"))
    return out
