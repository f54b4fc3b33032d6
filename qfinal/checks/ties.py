"""tie_audit and meta_tensors: the ties a model class declares, what the checkpoint holds for them,
whether the finalized tensors really share storage, and what is left on the meta device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qfinal.report import Finding


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

    from qfinal.compat.transformers import class_tied_weights_keys

    requested = (
        dict(model.get_expanded_tied_weights_keys(all_submodels=True))
        if hasattr(model, "get_expanded_tied_weights_keys")
        else dict(getattr(model, "all_tied_weights_keys", {}) or {})
    )
    out = {t: DeclaredTie(t, s, True) for t, s in requested.items()}
    names = None
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel) or getattr(sub.config, "tie_word_embeddings", False):
            continue
        mapping = class_tied_weights_keys(sub)
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


def _holds(tie: DeclaredTie, kt: str | None, ks: str | None, keys_known: bool) -> str:
    if not keys_known:
        return "keys unknown (pickle weights)"
    if kt and ks:
        return "both keys"
    if kt or ks:
        return f"only {tie.target if kt else tie.source}"
    return "neither key"


def _halves_equal(kt: str, ks: str, shapes: dict | None, read_tensor) -> bool | None:
    """Whether both stored halves hold the same data; None when that cannot be told."""
    if shapes is not None and tuple(shapes[kt]) != tuple(shapes[ks]):
        return False
    if read_tensor is None:
        return None
    import torch

    a, b = read_tensor(kt), read_tensor(ks)
    return bool(a.shape == b.shape and torch.equal(a, b.to(a.dtype)))


def _verdict(
    tie: DeclaredTie, *, keys_known: bool, kt, ks, equal, shared, full: bool, tie_enabled: bool
) -> tuple[str, str]:
    """(severity, why) of one tie's finding."""
    both = bool(kt and ks)
    if not tie.requested:
        if shared:
            return "warning", "tied although the config does not ask for it"
        if keys_known and not both:
            return "info", "kept separate; the absent half is reported by missing_keys"
        return "info", ""
    if keys_known and not kt and not ks:
        return "error", "nothing to tie to: both halves are initialized at random"
    if equal is False:
        return "error", (
            "the head has its own data, so transformers keeps the pair separate and the model "
            "does not match its config (set tie_word_embeddings: false, or drop the extra key)"
        )
    if not full:  # fast mode
        if both:
            return "warning", "fast mode cannot compare their data; transformers ties them only if equal"
        return "info", ""
    if shared or shared is None:
        return "info", ""
    if not tie_enabled:
        if both:
            return "warning", "kept separate because tie_weights is false"
        return "error", "tie_weights is false, so the absent half is never filled"
    if not keys_known:
        return "error", "not tied: transformers keeps a pair separate when both keys hold different data"
    return "error", "the tie did not resolve"


def tie_findings(
    ties: list[DeclaredTie],
    present: Callable[[str], str | None] | None,
    *,
    model=None,
    read_tensor: Callable[[str], object] | None = None,
    tie_enabled: bool = True,
    shapes: dict | None = None,
    offload_index: dict | None = None,
) -> list[Finding]:
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
    keys_known = present is not None
    for tie in ties:
        t, s = tie.target, tie.source
        kt, ks = (present(t), present(s)) if keys_known else (None, None)
        both = bool(kt and ks)
        # an unrequested pair is meant to differ: no need to read it
        equal = _halves_equal(kt, ks, shapes, read_tensor) if both and tie.requested else None
        shared = same_tensor(model, t, s, offload_index) if model is not None else None
        asks = "config asks to tie" if tie.requested else "config does not ask to tie (tie_word_embeddings: false)"
        facts = f"{t} <- {s}: {asks}; checkpoint holds {_holds(tie, kt, ks, keys_known)}"
        if both and tie.requested:
            facts += {True: ", equal", False: ", different data", None: " (data not compared)"}[equal]
        if model is not None:
            facts += (
                "; finalized tensors "
                + {True: "share storage", False: "do not share storage", None: "are offloaded (sharing not checked)"}[
                    shared
                ]
            )
        severity, why = _verdict(
            tie,
            keys_known=keys_known,
            kt=kt,
            ks=ks,
            equal=equal,
            shared=shared,
            full=model is not None,
            tie_enabled=tie_enabled,
        )
        out.append(Finding(check="tie_audit", severity=severity, key=t, message=facts + (f" — {why}" if why else "")))
    return out


def meta_findings(model, missing: set[str], ties: list[DeclaredTie]) -> list[Finding]:
    """meta_tensors: parameters and buffers still on the meta device after finalization, with why.

    Tensors accelerate offloaded (a hook that loads them on use) are on meta by design and skipped.
    """
    from qfinal.compat.transformers import is_offloaded, non_persistent_buffer_names

    out = []
    modules = dict(model.named_modules())
    tie_of = {t.target: t for t in ties if t.requested}
    for kind, items in (
        ("parameter", model.named_parameters(remove_duplicate=False)),
        ("buffer", model.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in items:
            if tensor is None or tensor.device.type != "meta":
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = modules.get(owner_name)
            if owner is not None and is_offloaded(owner):
                continue
            if name in tie_of:
                reason = f"a tie that did not resolve (tied to {tie_of[name].source})"
            elif name in missing:
                reason = "the key is missing from the checkpoint"
            elif kind == "buffer" and owner is not None and leaf in non_persistent_buffer_names(owner):
                reason = "a non-persistent buffer that was never materialized"
            else:
                reason = "never loaded or initialized"
            out.append(
                Finding(
                    check="meta_tensors",
                    severity="error",
                    key=name,
                    message=f"{kind} left on the meta device: {reason}",
                )
            )
    return out
