"""The named checks behind `validate`. Names are stable: CI filters, JSON and JUnit use them.

Header checks read only the inventory (safetensors headers + index) and the raw config.json, so
`validate --fast` and the full pipeline share them. Model checks need the finalized model.

Every check returns `Finding`s. A check with no error or warning finding passed; info findings
say what was looked at (and what an allow-list let through).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from qfinal.report import Finding

CHECKS = ("checkpoint_files", "safetensors_header", "index_consistency", "file_confinement", "pickle_refused",
          "missing_keys", "unexpected_keys", "shape_mismatch", "dtype_consistency", "quantization_config",
          "meta_tensors", "tie_audit", "nan_inf", "adapter_coverage")

# Checkpoint-level checks: `safety.inspect_checkpoint` reports them as `Problem`s.
HEADER_CHECKS = ("checkpoint_files", "safetensors_header", "index_consistency", "file_confinement",
                 "pickle_refused")
# Checks that compare the checkpoint's keys, shapes and dtypes with the model; they need headers.
KEY_CHECKS = ("missing_keys", "unexpected_keys", "shape_mismatch", "dtype_consistency", "quantization_config",
              "tie_audit")
FULL_MODE_CHECKS = tuple(c for c in CHECKS if c != "adapter_coverage")
FAST_MODE_CHECKS = tuple(c for c in CHECKS if c not in ("nan_inf", "meta_tensors", "adapter_coverage"))

QUANT_4BIT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                       ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
QUANT_8BIT_SUFFIXES = (".SCB", ".weight_format")
QUANT_STATE_SUFFIXES = QUANT_4BIT_SUFFIXES + QUANT_8BIT_SUFFIXES
FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
MAX_LISTED = 8  # keys named inline in one message


def is_quant_state_key(key: str) -> bool:
    return key.endswith(QUANT_STATE_SUFFIXES)


def _listing(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- allow-lists


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
                raise ConfigError(f"bad regular expression {pattern!r}: {err}", where=where,
                                  hint="entries are globs, or 're:' followed by a Python regex") from None
        else:
            globs.append(pattern)

    def matches(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, g) for g in globs) or any(r.search(key) for r in regexes)

    return matches


# ----------------------------------------------------------------------------- keys


def key_findings(missing, unexpected, mismatched, allow_missing=(), allow_unexpected=(),
                 unreadable: dict[str, str] | None = None) -> list[Finding]:
    """missing_keys, unexpected_keys, shape_mismatch.

    `mismatched` holds (key, checkpoint shape, model shape). `unreadable` maps a missing key to the
    shard the index puts it in when that shard could not be read: the checkpoint-level finding
    already fails for it, so the key is listed as info here rather than counted twice.
    """
    unreadable = unreadable or {}
    allowed_missing = compile_patterns(allow_missing, "validate.allow_missing")
    allowed_unexpected = compile_patterns(allow_unexpected, "validate.allow_unexpected")
    out = []
    for key in sorted(missing):
        if key in unreadable:
            out.append(Finding(check="missing_keys", severity="info", key=key,
                               message=f"the index puts it in '{unreadable[key]}', which could not be read "
                                       "(reported by the checkpoint-level check)"))
        elif allowed_missing(key):
            out.append(Finding(check="missing_keys", severity="info", key=key,
                               message="not in the checkpoint; allowed by validate.allow_missing"))
        else:
            out.append(Finding(check="missing_keys", severity="error", key=key,
                               message="not in the checkpoint: transformers initializes it at random"))
    for key in sorted(unexpected):
        allowed = allowed_unexpected(key)
        out.append(Finding(check="unexpected_keys", severity="info" if allowed else "error", key=key,
                           message=("in the checkpoint but not in the model; allowed by validate.allow_unexpected"
                                    if allowed else "in the checkpoint but not in the model: it is ignored")))
    for key, ckpt_shape, model_shape in sorted(mismatched, key=lambda m: m[0]):
        out.append(Finding(check="shape_mismatch", severity="error", key=key,
                           message=f"checkpoint shape {list(ckpt_shape)} != model shape {list(model_shape)}: "
                                   "transformers initializes it at random instead"))
    return out


def inventory_findings(inventory) -> list[Finding]:
    """The checkpoint-level problems `safety.inspect_checkpoint` collected, one error each."""
    return [p.to_finding() for p in inventory.problems]


# ----------------------------------------------------------------------------- dtype


def quantized_weight_keys(tensors) -> set[str]:
    """Checkpoint keys of bnb-packed weights: those that carry quant state next to them."""
    out = set()
    for key in tensors:
        if key.endswith(QUANT_4BIT_SUFFIXES):
            for suffix in QUANT_4BIT_SUFFIXES:
                if key.endswith(suffix):
                    out.add(key[: -len(suffix)])
                    break
        elif key.endswith(".SCB"):
            out.add(key[: -len(".SCB")] + ".weight")
    return out


def dtype_findings(raw_config: dict, inventory, keep_fp32: Iterable[str] = ()) -> list[Finding]:
    """dtype_consistency: config.json's `dtype` (legacy `torch_dtype`) against the floating tensors.

    Quant state, bnb-packed weights and `_keep_in_fp32_modules` are left out. None of the floating
    tensors in the declared dtype is an error; some outside it is a warning.
    """
    declared = raw_config.get("dtype")
    field = "dtype"
    if declared is None:
        declared, field = raw_config.get("torch_dtype"), "torch_dtype"
    if declared is None or declared == "auto":
        return [Finding(check="dtype_consistency", severity="info",
                        message="config.json declares no dtype; transformers loads in float32 unless told")]
    if not isinstance(declared, str):
        return [Finding(check="dtype_consistency", severity="info",
                        message=f"config.json {field} is a {type(declared).__name__} (per sub-model); not checked")]
    declared = declared.removeprefix("torch.")
    keep_fp32 = tuple(keep_fp32 or ())
    packed = quantized_weight_keys(inventory.tensors)
    counts: dict[str, list[str]] = {}
    for name, entry in inventory.tensors.items():
        if entry.dtype not in FLOAT_CODES or is_quant_state_key(name) or name in packed:
            continue
        if keep_fp32 and any(k in name for k in keep_fp32):
            continue
        counts.setdefault(FLOAT_CODES[entry.dtype], []).append(name)
    total = sum(len(v) for v in counts.values())
    matching = len(counts.get(declared, []))
    if not total:
        return [Finding(check="dtype_consistency", severity="info",
                        message=f"config dtype {declared}; the checkpoint holds no floating tensor to compare")]
    if matching == total:
        return [Finding(check="dtype_consistency", severity="info",
                        message=f"config dtype {declared} matches all {total} floating tensor(s)")]
    found = ", ".join(f"{len(n)} {d}" for d, n in sorted(counts.items()))
    key = f"config.json:{field}"
    if not matching:
        return [Finding(check="dtype_consistency", severity="error", key=key,
                        message=f"config.json says {declared} but the floating tensors are {found}: "
                                "dtype=auto would cast every weight on load")]
    others = sorted(n for d, names in counts.items() if d != declared for n in names)
    return [Finding(check="dtype_consistency", severity="warning", key=key,
                    message=f"config.json says {declared} but {len(others)} of {total} floating tensor(s) are "
                            f"not ({found}): {_listing(others)}")]


# ----------------------------------------------------------------------------- quantization


def _state_base(key: str) -> tuple[str, str] | None:
    """('x.weight', '.absmax') for 'x.weight.absmax'; 8-bit state hangs off the module: ('x.weight', '.SCB')."""
    for suffix in QUANT_4BIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    for suffix in QUANT_8BIT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight", suffix
    return None


def quantization_findings(raw_config: dict, inventory, quantized_modules: Iterable[str] | None = None,
                          key_of: Callable[[str], str | None] | None = None) -> list[Finding]:
    """quantization_config: config.json's quantization_config against the tensors actually present.

    Globally: quant state without a quantization_config (packed bytes would load as weights), the
    wrong kind of state (4-bit vs 8-bit, nf4 vs fp4, double quant or not). Per module, when
    `quantized_modules` (the modules the quantizer converted) is given: each holds its weight and
    complete state, and no state belongs to a module the quantizer keeps in full precision.
    `key_of` maps a model key to the checkpoint key (base-model prefix differences).
    """
    tensors = inventory.tensors
    if not tensors:
        return []
    key_of = key_of or (lambda k: k if k in tensors else None)
    qc = raw_config.get("quantization_config")
    states = {k: b for k in tensors if (b := _state_base(k)) is not None}
    has_4bit = any(s in QUANT_4BIT_SUFFIXES for _, s in states.values())
    has_8bit = any(s == ".SCB" for _, s in states.values())
    if qc is None:
        if states:
            return [Finding(check="quantization_config", severity="error", key="config.json:quantization_config",
                            message=f"the checkpoint holds bitsandbytes quant state ({len(states)} tensor(s), e.g. "
                                    f"{_listing(sorted(states), 3)}) but config.json has no quantization_config: "
                                    "transformers would load packed bytes as weights")]
        return [Finding(check="quantization_config", severity="info",
                        message="no quantization_config and no quant state in the checkpoint")]
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        return [Finding(check="quantization_config", severity="info",
                        message=f"quant_method {method!r} is not checked by qfinal (bitsandbytes only)")]
    wants_4bit, wants_8bit = bool(qc.get("load_in_4bit")), bool(qc.get("load_in_8bit"))
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    double = bool(qc.get("bnb_4bit_use_double_quant"))
    problems: list[tuple[str | None, str]] = []
    where = "config.json:quantization_config"
    if not wants_4bit and not wants_8bit:
        problems.append((where, "quantization_config sets neither load_in_4bit nor load_in_8bit"))
    if wants_4bit and not has_4bit:
        problems.append((where, "quantization_config says 4-bit but no absmax/quant_state tensors are present"))
    if wants_8bit and not has_8bit:
        problems.append((where, "quantization_config says 8-bit but no SCB tensors are present"))
    if wants_4bit and has_8bit:
        problems.append((where, "quantization_config says 4-bit but SCB (8-bit) tensors are present"))
    if wants_8bit and has_4bit:
        problems.append((where, "quantization_config says 8-bit but 4-bit quant state is present"))
    if wants_4bit and has_4bit:
        other = "fp4" if kind == "nf4" else "nf4"
        wrong = sorted(k for k in tensors if k.endswith(f".quant_state.bitsandbytes__{other}"))
        if wrong:
            problems.append((where, f"quantization_config says {kind} but {len(wrong)} tensor(s) hold {other} "
                                    f"quant state: {_listing(wrong, 3)}"))
        nested = sorted(k for k in tensors if k.endswith((".nested_absmax", ".nested_quant_map")))
        if double and not nested:
            problems.append((where, "quantization_config says bnb_4bit_use_double_quant but no nested_absmax "
                                    "tensors are present"))
        if nested and not double:
            problems.append((where, "nested_absmax tensors are present but quantization_config does not set "
                                    "bnb_4bit_use_double_quant"))

    if quantized_modules is not None and not problems:
        modules = set(quantized_modules)
        weights = {f"{m}.weight": m for m in modules}
        if wants_4bit:
            need = [".absmax", ".quant_map", f".quant_state.bitsandbytes__{kind}"]
            if double:
                need += [".nested_absmax", ".nested_quant_map"]
        else:
            need = [".SCB"]
        for weight, module in sorted(weights.items()):
            ckpt = key_of(weight)
            if ckpt is None:
                continue  # reported by missing_keys
            base = ckpt[: -len(".weight")]
            names = [ckpt + s for s in need] if wants_4bit else [base + s for s in need]
            lacking = [n for n in names if n not in tensors]
            if lacking:
                problems.append((weight, f"quantized module {module} lacks its quant state: "
                                         f"{_listing(lacking, 5)}"))
            elif wants_8bit and tensors[ckpt].dtype != "I8":
                problems.append((weight, f"8-bit weight stored as {tensors[ckpt].dtype}, not I8"))
        ckpt_weights = {key_of(w) for w in weights} - {None}
        stray = sorted(k for k, (b, _) in states.items() if b not in ckpt_weights)
        if stray:
            problems.append((stray[0], f"{len(stray)} quant-state tensor(s) belong to no quantized module "
                                       f"(skipped modules or renamed keys): {_listing(stray, 5)}"))
    if problems:
        return [Finding(check="quantization_config", severity="error", key=k, message=m) for k, m in problems]
    mode = "int8" if wants_8bit else kind + ("+double_quant" if double else "")
    checked = f"; {len(set(quantized_modules))} quantized module(s) complete" if quantized_modules is not None else ""
    return [Finding(check="quantization_config", severity="info",
                    message=f"quant state matches quantization_config ({mode}){checked}")]


# ----------------------------------------------------------------------------- ties


@dataclass(frozen=True)
class DeclaredTie:
    target: str
    source: str
    requested: bool  # the config asks for it (tie_word_embeddings)


def declared_ties(model) -> list[DeclaredTie]:
    """Every tie the model class declares, whether or not the config asks for it.

    transformers' own `all_tied_weights_keys` drops ties the config does not request and, while
    loading, ties it refused (both keys present with different data): both must still be audited.
    """
    from transformers import PreTrainedModel

    requested = dict(model.get_expanded_tied_weights_keys(all_submodels=True)) \
        if hasattr(model, "get_expanded_tied_weights_keys") else dict(getattr(model, "all_tied_weights_keys", {}) or {})
    out = {t: DeclaredTie(t, s, True) for t, s in requested.items()}
    names = None
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel) or getattr(sub.config, "tie_word_embeddings", False):
            continue
        mapping = getattr(sub, "_tied_weights_keys", None)
        if not isinstance(mapping, dict):
            continue
        if names is None:
            names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
            names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        for t, s in mapping.items():
            t, s = (f"{prefix}.{t}", f"{prefix}.{s}") if prefix else (t, s)
            if t in names and s in names and t not in out:  # plain names only; patterns need the config
                out[t] = DeclaredTie(t, s, False)
    return [out[t] for t in sorted(out)]


def same_tensor(model, target: str, source: str, offload_index: dict | None = None) -> bool | None:
    """True when both names resolve to one storage; None when that cannot be told (offloaded).

    With accelerate's disk `offload_index` (name -> where the hook reads the weight at forward
    time), an offloaded half shares storage only if both names read the same bytes: the same
    tensor of the same checkpoint file. A half on disk and the other in memory, or two offload
    files, are two copies, whatever the Parameter objects say.
    """
    try:
        a, b = model.get_parameter(target), model.get_parameter(source)
    except AttributeError:
        return False
    if offload_index:
        ea, eb = offload_index.get(target), offload_index.get(source)
        if ea is not None or eb is not None:
            if ea is None or eb is None:
                return False
            where_a = (ea.get("safetensors_file"), ea.get("weight_name"))
            return ea is eb or (None not in where_a and where_a == (eb.get("safetensors_file"), eb.get("weight_name")))
    if a is b:
        return True
    if a.device.type == "meta" or b.device.type == "meta":
        return None if (a.device.type == "meta" and b.device.type == "meta") else False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape


def tie_findings(ties: list[DeclaredTie], present: Callable[[str], str | None] | None, *,
                 model=None, read_tensor: Callable[[str], object] | None = None,
                 tie_enabled: bool = True, shapes: dict | None = None,
                 offload_index: dict | None = None) -> list[Finding]:
    """tie_audit: for each declared tie, whether the config asks for it, whether the checkpoint
    holds one key or both (and whether both are equal), and whether the finalized tensors share
    storage. One finding per tie, stating all of it.

    `present(model_key)` gives the checkpoint key or None (`present=None`: unknown, pickle weights).
    With `model` (full mode) storage sharing is checked, and `read_tensor(checkpoint_key)` compares
    both halves when the checkpoint holds both. Fast mode passes neither: it cannot see data, so
    "both keys" is a warning there; `shapes` (checkpoint key -> shape) still catches halves that
    cannot be equal.
    """
    out = []
    for tie in ties:
        t, s = tie.target, tie.source
        kt, ks = (present(t), present(s)) if present is not None else (None, None)
        if present is None:
            holds = "keys unknown (pickle weights)"
        elif kt and ks:
            holds = "both keys"
        elif kt or ks:
            holds = f"only {t if kt else s}"
        else:
            holds = "neither key"
        both = bool(kt and ks)
        equal = None
        if both and tie.requested:  # an unrequested pair is meant to differ: no need to read it
            if shapes is not None and tuple(shapes[kt]) != tuple(shapes[ks]):
                equal = False
            elif read_tensor is not None:
                import torch

                a, b = read_tensor(kt), read_tensor(ks)
                equal = bool(a.shape == b.shape and torch.equal(a, b.to(a.dtype)))
        shared = same_tensor(model, t, s, offload_index) if model is not None else None
        asks = "config asks to tie" if tie.requested else "config does not ask to tie (tie_word_embeddings: false)"
        facts = f"{t} <- {s}: {asks}; checkpoint holds {holds}"
        if both and tie.requested:
            facts += {True: ", equal", False: ", different data", None: " (data not compared)"}[equal]
        if model is not None:
            facts += "; finalized tensors " + {True: "share storage", False: "do not share storage",
                                               None: "are offloaded (sharing not checked)"}[shared]

        def add(severity: str, why: str = "") -> None:
            out.append(Finding(check="tie_audit", severity=severity, key=t,
                               message=facts + (f" — {why}" if why else "")))

        if not tie.requested:
            if shared:
                add("warning", "tied although the config does not ask for it")
            elif present is not None and not both:
                add("info", "kept separate; the absent half is reported by missing_keys")
            else:
                add("info")
        elif present is not None and not kt and not ks:
            add("error", "nothing to tie to: both halves are initialized at random")
        elif equal is False:
            add("error", "the head has its own data, so transformers keeps the pair separate and the model "
                         "does not match its config (set tie_word_embeddings: false, or drop the extra key)")
        elif model is None:  # fast mode
            if both:
                add("warning", "fast mode cannot compare their data; transformers ties them only if equal")
            else:
                add("info")
        elif shared or shared is None:
            add("info")
        elif not tie_enabled:
            if both:
                add("warning", "kept separate because tie_weights is false")
            else:
                add("error", "tie_weights is false, so the absent half is never filled")
        elif present is None:
            add("error", "not tied: transformers keeps a pair separate when both keys hold different data")
        else:
            add("error", "the tie did not resolve")
    return out


# ----------------------------------------------------------------------------- model checks


def _offloaded(module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(hook is not None and getattr(hook, "offload", False))


def meta_findings(model, missing: set[str], ties: list[DeclaredTie]) -> list[Finding]:
    """meta_tensors: parameters and buffers still on the meta device after finalization, with why.

    Tensors accelerate offloaded (a hook that loads them on use) are on meta by design and skipped.
    """
    out = []
    modules = dict(model.named_modules())
    tie_of = {t.target: t for t in ties if t.requested}
    for kind, items in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in items:
            if tensor is None or tensor.device.type != "meta":
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = modules.get(owner_name)
            if owner is not None and _offloaded(owner):
                continue
            if name in tie_of:
                reason = f"a tie that did not resolve (tied to {tie_of[name].source})"
            elif name in missing:
                reason = "the key is missing from the checkpoint"
            elif kind == "buffer" and owner is not None and leaf in owner._non_persistent_buffers_set:
                reason = "a non-persistent buffer that was never materialized"
            else:
                reason = "never loaded or initialized"
            out.append(Finding(check="meta_tensors", severity="error", key=name,
                               message=f"{kind} left on the meta device: {reason}"))
    return out




_SCAN_CHUNK = 1 << 20  # bytes read from a file at a time: a multiple of every element size, L2-sized


def _finite_range(values) -> bool:
    import torch

    lo, hi = torch.aminmax(values)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _all_finite(tensor, views=None, buffer: bytearray | None = None) -> bool:
    """min and max propagate NaN and reach ±Inf: two reductions and no boolean temporary, about
    20x faster than isfinite().all() (it was most of a bf16 load's overhead over transformers).

    With `views` (a `residency.FileViews`), a tensor that is a never-written view of a mapped file
    and not yet resident is read from the file in chunks, so the scan does not page it in (a
    1.1B Llama's 131 MB embedding, of which a forward pass reads a few rows)."""
    import torch

    if tensor.numel() == 0:
        return True
    flat = tensor.detach().reshape(-1)
    where = views.file_view(flat, unless_resident=True) if views is not None else None
    if where is None:
        return _finite_range(flat)
    from qfinal.checkpoint.residency import read_chunks

    fd, offset = where
    nbytes = flat.numel() * flat.element_size()
    for chunk in read_chunks(fd, offset, nbytes, buffer if buffer is not None else bytearray(_SCAN_CHUNK)):
        if not _finite_range(torch.frombuffer(chunk, dtype=flat.dtype)):
            return False
    return True


def _float_tensors(model):
    """(name, tensor) for every floating parameter, buffer and bnb quant-state tensor, once each."""
    seen = set()
    items = list(model.named_parameters()) + list(model.named_buffers())
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        prefix = f"{module_name}.weight" if module_name else "weight"
        state = getattr(weight, "quant_state", None)
        if state is not None:
            items.append((f"{prefix}.absmax", getattr(state, "absmax", None)))
            nested = getattr(state, "state2", None)
            if nested is not None:
                items.append((f"{prefix}.nested_absmax", getattr(nested, "absmax", None)))
        scb = getattr(weight, "SCB", None)
        if scb is not None:
            items.append((f"{module_name}.SCB", scb))
    for name, tensor in items:
        if tensor is None or not hasattr(tensor, "is_floating_point") or not tensor.is_floating_point():
            continue
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        if getattr(tensor, "bnb_quantized", False):
            continue  # packed 4-bit codes: with a float quant_storage its bytes read as NaNs, not values
        seen.add(id(tensor))
        yield name, tensor


def _lookup_tables(model) -> set[int]:
    """ids of the tensors a forward pass reads only a few rows of: embedding tables, unless a
    non-embedding module (a tied output head) also uses them, which reads all of them."""
    import torch

    tables, used_whole = set(), set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            tables.update(id(p) for p in own)
        else:
            used_whole.update(id(p) for p in own)
    return tables - used_whole


def nan_findings(model, prescan=None) -> list[Finding]:
    """nan_inf: NaN or Inf in any floating tensor of the finalized model (bnb absmax/SCB included).

    With `prescan` (a `prescan.Prescan` that read the checkpoint files while torch was imported),
    a tensor proven a never-written view of a file span it found clean is not read again.
    Embedding tables are read from their file when they are untouched views of it (see
    `_all_finite`): the forward pass pages in only the rows it looks up. Every other tensor is
    read where it is: the forward pass reads it whole anyway, and reading a file costs a copy."""
    import torch

    from qfinal.checkpoint.residency import FileViews

    out = []
    buffer = bytearray(_SCAN_CHUNK)
    tables = _lookup_tables(model)
    if prescan is not None:
        prescan.stop()
    with torch.no_grad(), FileViews() as views:
        for name, tensor in _float_tensors(model):
            if prescan is not None:
                where = views.locate(tensor)
                if where is not None and prescan.clean(where):
                    continue
            if _all_finite(tensor, views if id(tensor) in tables else None, buffer):
                continue
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            out.append(Finding(check="nan_inf", severity="error", key=name,
                               message=f"{nan} NaN and {inf} Inf value(s) in {tensor.numel()} "
                                       f"({str(tensor.dtype).removeprefix('torch.')})"))
    return out
