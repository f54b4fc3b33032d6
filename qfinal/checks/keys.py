"""Header checks of keys and dtypes: missing_keys, unexpected_keys, shape_mismatch, dtype_consistency,
and the checkpoint-level problems the inventory collected."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Container, Iterable

from qfinal.checkpoint.dtypes import MODEL_FLOATS
from qfinal.formats import is_quant_state_key, packed_weight_keys
from qfinal.formats.base import listing
from qfinal.report import Finding


def checkpoint_lookup(tensors: Container[str], base_model_prefix: str) -> Callable[[str], str | None]:
    """model key -> checkpoint key, allowing for the base-model prefix transformers adds or strips."""
    prefix = f"{base_model_prefix}." if base_model_prefix else None

    def lookup(key: str) -> str | None:
        if key in tensors:
            return key
        if prefix:
            if key.startswith(prefix) and key[len(prefix) :] in tensors:
                return key[len(prefix) :]
            if prefix + key in tensors:
                return prefix + key
        return None

    return lookup


def compile_patterns(patterns: Iterable[str], where: str) -> Callable[[str], bool]:
    """A matcher for allow-list entries: a glob (`*`, `?`, `[...]`, whole key) or `re:REGEX`
    (searched anywhere in the key; anchor with ^ and $). A bad regex is a ConfigError (exit 2)."""
    from qfinal.errors import ConfigError

    globs: list[str] = []
    regexes: list[re.Pattern] = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                regexes.append(re.compile(pattern[3:]))
            except re.error as err:
                raise ConfigError(
                    f"bad regular expression {pattern!r}: {err}",
                    where=where,
                    hint="entries are globs, or 're:' followed by a Python regex",
                ) from None
        else:
            globs.append(pattern)

    def matches(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, g) for g in globs) or any(r.search(key) for r in regexes)

    return matches


def key_findings(
    missing, unexpected, mismatched, allow_missing=(), allow_unexpected=(), unreadable: dict[str, str] | None = None
) -> list[Finding]:
    """missing_keys, unexpected_keys, shape_mismatch.

    `mismatched` holds (key, checkpoint shape, model shape). `unreadable` maps a missing key to the
    shard the index puts it in when that shard could not be read: the checkpoint-level finding
    already fails for it, so the key is listed as info here rather than counted twice.
    """
    unreadable = unreadable or {}
    allowed_missing = compile_patterns(allow_missing, "validate.allow_missing")
    allowed_unexpected = compile_patterns(allow_unexpected, "validate.allow_unexpected")
    out = [_missing_finding(key, unreadable, allowed_missing) for key in sorted(missing)]
    out += [_unexpected_finding(key, allowed_unexpected(key)) for key in sorted(unexpected)]
    for key, ckpt_shape, model_shape in sorted(mismatched, key=lambda m: m[0]):
        out.append(
            Finding(
                check="shape_mismatch",
                severity="error",
                key=key,
                message=f"checkpoint shape {list(ckpt_shape)} != model shape {list(model_shape)}: "
                "transformers initializes it at random instead",
            )
        )
    return out


def _missing_finding(key: str, unreadable: dict[str, str], allowed: Callable[[str], bool]) -> Finding:
    if key in unreadable:
        return Finding(
            check="missing_keys",
            severity="info",
            key=key,
            message=f"the index puts it in '{unreadable[key]}', which could not be read "
            "(reported by the checkpoint-level check)",
        )
    if allowed(key):
        return Finding(
            check="missing_keys",
            severity="info",
            key=key,
            message="not in the checkpoint; allowed by validate.allow_missing",
        )
    return Finding(
        check="missing_keys",
        severity="error",
        key=key,
        message="not in the checkpoint: transformers initializes it at random",
    )


def _unexpected_finding(key: str, allowed: bool) -> Finding:
    return Finding(
        check="unexpected_keys",
        severity="info" if allowed else "error",
        key=key,
        message=(
            "in the checkpoint but not in the model; allowed by validate.allow_unexpected"
            if allowed
            else "in the checkpoint but not in the model: it is ignored"
        ),
    )


def inventory_findings(inventory) -> list[Finding]:
    """The checkpoint-level problems `inventory.inspect_checkpoint` collected, one error each."""
    return [p.to_finding() for p in inventory.problems]


def _declared_dtype(raw_config: dict) -> tuple[object, str]:
    """(config.json's `dtype`, or its legacy `torch_dtype`; the field it came from)."""
    declared = raw_config.get("dtype")
    if declared is None:
        return raw_config.get("torch_dtype"), "torch_dtype"
    return declared, "dtype"


def dtype_findings(raw_config: dict, inventory, keep_fp32: Iterable[str] = ()) -> list[Finding]:
    """dtype_consistency: config.json's `dtype` (legacy `torch_dtype`) against the floating tensors.

    Quant state, packed quantized weights and `_keep_in_fp32_modules` are left out. None of the
    floating tensors in the declared dtype is an error; some outside it is a warning.
    """
    declared, field = _declared_dtype(raw_config)
    if declared is None or declared == "auto":
        return [_dtype_finding("info", "config.json declares no dtype; transformers loads in float32 unless told")]
    if not isinstance(declared, str):
        return [
            _dtype_finding("info", f"config.json {field} is a {type(declared).__name__} (per sub-model); not checked")
        ]
    declared = declared.removeprefix("torch.")
    counts = _floating_by_dtype(inventory, keep_fp32)
    total = sum(len(v) for v in counts.values())
    matching = len(counts.get(declared, []))
    if not total:
        return [_dtype_finding("info", f"config dtype {declared}; the checkpoint holds no floating tensor to compare")]
    if matching == total:
        return [_dtype_finding("info", f"config dtype {declared} matches all {total} floating tensor(s)")]
    found = ", ".join(f"{len(n)} {d}" for d, n in sorted(counts.items()))
    key = f"config.json:{field}"
    if not matching:
        return [
            _dtype_finding(
                "error",
                f"config.json says {declared} but the floating tensors are {found}: "
                "dtype=auto would cast every weight on load",
                key,
            )
        ]
    others = sorted(n for d, names in counts.items() if d != declared for n in names)
    return [
        _dtype_finding(
            "warning",
            f"config.json says {declared} but {len(others)} of {total} floating tensor(s) are "
            f"not ({found}): {listing(others)}",
            key,
        )
    ]


def _floating_by_dtype(inventory, keep_fp32: Iterable[str]) -> dict[str, list[str]]:
    """dtype -> names of the floating tensors the dtype check judges (quant state, packed weights and
    `_keep_in_fp32_modules` left out)."""
    keep_fp32 = tuple(keep_fp32 or ())
    packed = packed_weight_keys(inventory.tensors)
    counts: dict[str, list[str]] = {}
    for name, entry in inventory.tensors.items():
        if entry.dtype not in MODEL_FLOATS or is_quant_state_key(name) or name in packed:
            continue
        if keep_fp32 and any(k in name for k in keep_fp32):
            continue
        counts.setdefault(MODEL_FLOATS[entry.dtype], []).append(name)
    return counts


def _dtype_finding(severity: str, message: str, key: str | None = None) -> Finding:
    return Finding(check="dtype_consistency", severity=severity, key=key, message=message)
