"""A compressed-tensors quantization_config read without compressed_tensors: its config groups,
their weight arguments and storage format, the ignore list, and which group a stored module is in.

Matching follows compressed-tensors' `match_targets`: exact names, then `re:` regexes (sorted as
the library sorts them), then class names. From the headers alone a module's class is unknown, so
a class target ("Linear") matches any module that holds quant state; a module two different class
targets could claim is refused rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qfinal.formats.base import Scheme

PACKED = "pack-quantized"
NAIVE = ("naive-quantized", "int-quantized", "float-quantized")
FORMATS = (PACKED, *NAIVE)
STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class WeightArgs:
    """A config group's `weights` arguments, as far as storage and dequantization need them."""

    num_bits: int
    type: str  # "int" | "float"
    symmetric: bool
    strategy: str  # tensor | channel | group | block
    group_size: int | None = None
    block: tuple[int, int] | None = None
    actorder: str | None = None

    @property
    def label(self) -> str:
        kind = f"int{self.num_bits}" if self.type == "int" else f"fp{self.num_bits}"
        how = {"group": f"group {self.group_size}", "block": f"block {list(self.block or ())}"}.get(
            self.strategy, self.strategy
        )
        return f"{kind} {how} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class Group:
    """One config group: its targets, weight arguments, storage format and activation arguments."""

    name: str
    targets: tuple[str, ...]
    weights: WeightArgs
    format: str
    input_static: bool = False  # static input activations store input_scale (and a zero point if asym)
    input_symmetric: bool = True


@dataclass(frozen=True)
class CtScheme(Scheme):
    """The compressed-tensors scheme: its groups (in config order) and ignore list."""

    groups: tuple[Group, ...] = ()
    ignore: tuple[str, ...] = ()


def _int(value, what: str, errors: list[str], minimum: int = 1) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        errors.append(f"{what} must be an integer ≥ {minimum}, not {value!r}")
        return None
    return value


def _strategy(w: dict) -> str:
    """The strategy compressed-tensors infers when the config leaves it out."""
    strategy = w.get("strategy")
    if strategy is None:
        group = w.get("group_size")
        return "tensor" if group is None else ("channel" if group == -1 else "group")
    return str(strategy).lower()


def _weight_args(w: dict, where: str, errors: list[str]) -> WeightArgs | None:
    if w.get("dynamic") not in (False, None):
        errors.append(f"{where}: dynamic weight quantization stores no scales")
        return None
    kind, strategy = str(w.get("type", "int")).lower(), _strategy(w)
    bits = _int(w.get("num_bits", 8), f"{where}.num_bits", errors)
    if kind not in ("int", "float") or strategy not in STRATEGIES:
        errors.append(f"{where}: type {kind!r} with strategy {strategy!r} is not read by qfinal")
        return None
    group = _int(w.get("group_size"), f"{where}.group_size", errors) if strategy == "group" else None
    block = w.get("block_structure")
    if strategy == "block":
        if isinstance(block, str):
            block = [int(b) for b in block.split("x")] if re.fullmatch(r"\d+x\d+", block) else block
        if not (isinstance(block, list) and len(block) == 2 and all(_int(b, "", []) for b in block)):
            errors.append(f"{where}.block_structure must be two positive integers, not {block!r}")
            return None
        block = tuple(block)
    if bits is None or (strategy == "group" and group is None):
        return None
    if kind == "float" and bits != 8:
        errors.append(f"{where}: float{bits} weights (nvfp4 / mxfp4) are not read by qfinal")
        return None
    actorder = w.get("actorder")
    return WeightArgs(bits, kind, bool(w.get("symmetric", True)), strategy, group, block, actorder and str(actorder))


def _group(name: str, raw, default_format: str | None, errors: list[str]) -> Group | None:
    where = f"config_groups.{name}"
    if not isinstance(raw, dict) or not isinstance(raw.get("targets"), list) or not raw["targets"]:
        errors.append(f"{where} must be a scheme with a non-empty list of targets")
        return None
    if not isinstance(raw.get("weights"), dict):
        errors.append(f"{where} quantizes no weights (only activations): qfinal reads weight quantization")
        return None
    fmt = raw.get("format") or default_format
    if fmt not in FORMATS:
        errors.append(f"{where}: format {fmt!r} is not read by qfinal ({', '.join(FORMATS)} are)")
        return None
    weights = _weight_args(raw["weights"], f"{where}.weights", errors)
    if weights is None:
        return None
    if fmt == PACKED and (weights.type != "int" or weights.num_bits > 8):
        errors.append(f"{where}: pack-quantized holds int weights of 1 to 8 bits, not {weights.label}")
        return None
    if fmt in NAIVE and weights.num_bits != 8:
        errors.append(f"{where}: {fmt} stores 8-bit weights, not {weights.num_bits}-bit")
        return None
    inputs = raw.get("input_activations")
    static = isinstance(inputs, dict) and inputs.get("dynamic") in (False, None)
    symmetric = not isinstance(inputs, dict) or bool(inputs.get("symmetric", True))
    return Group(name, tuple(str(t) for t in raw["targets"]), weights, fmt, static, symmetric)


def parse_config(qc: dict) -> tuple[CtScheme | None, list[str]]:
    """The scheme of a compressed-tensors quantization_config, or None and what is wrong with it."""
    errors: list[str] = []
    groups_raw = qc.get("config_groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        return None, ["config_groups must name at least one quantization scheme"]
    if qc.get("kv_cache_scheme"):
        errors.append("kv_cache_scheme (quantized attention caches) is not read by qfinal")
    default = qc.get("format")
    groups = [
        _group(str(n), raw, default if default != "mixed-precision" else None, errors) for n, raw in groups_raw.items()
    ]
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        errors.append(f"ignore must be a list of module names or re: patterns, not {ignore!r}")
    if errors:
        return None, errors
    method = "; ".join(f"{g.weights.label} ({g.format})" for g in groups)
    return CtScheme(f"compressed-tensors {method}", groups=tuple(groups), ignore=tuple(ignore)), []


def matches_name(name: str, target: str) -> bool:
    """compressed-tensors' `match_name`: `re:` prefix matches from the start, else the exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _is_class_target(target: str) -> bool:
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def is_ignored(module: str, scheme: CtScheme) -> bool:
    return any(matches_name(module, i) for i in scheme.ignore)


def group_of(module: str, scheme: CtScheme) -> tuple[Group | None, str | None]:
    """The group whose scheme quantizes `module` (a module that holds quant state), and None or
    why it cannot be told."""
    target_group: dict[str, Group] = {}
    for group in scheme.groups:
        for target in group.targets:
            target_group[target] = group  # a later group's identical target wins, as in the library
    ordered = sorted(target_group, key=lambda t: ("re:" in t, t))
    named = [t for t in ordered if matches_name(module, t)]
    if named:
        return target_group[named[0]], None
    classes = [t for t in ordered if _is_class_target(t)]
    candidates = {target_group[t] for t in classes}
    if len(candidates) == 1:
        return candidates.pop(), None
    if candidates:
        return None, f"class targets {classes} name different schemes; the headers do not say which class {module} is"
    return None, None


def targeted_by_name(module: str, scheme: CtScheme) -> Group | None:
    """The group whose exact-name or regex target names `module` (not a class target), if any."""
    for group in scheme.groups:
        if any(not _is_class_target(t) and matches_name(module, t) for t in group.targets):
            return group
    return None
