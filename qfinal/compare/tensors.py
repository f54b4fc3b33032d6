"""Tensor against tensor, and the verdict over many: bit equality, float64 value metrics,
tolerances and the findings a `Comparison` reports (conventions: `qfinal.compare`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from qfinal.report import Finding

if TYPE_CHECKING:  # pragma: no cover
    from qfinal.compare.outputs import OutputDiff

_CHUNK = 1 << 22  # elements per float64 chunk (32 MiB per side)

STATUSES = ("identical", "different", "only_a", "only_b", "shape", "dtype")


@dataclass
class TensorDiff:
    """One name, compared. `status` precedence: only_a/only_b, shape, dtype, different, identical.

    `shape_*`/`dtype_*` are as stored on each side (before layout alignment). `max_abs`/`rel_error`
    are None only when the values cannot be lined up (missing or shape). `status == "dtype"` still
    carries value metrics. `aligned` says which side was transposed to the other's layout ("a" or
    "b"), None when nothing was.
    """

    name: str
    status: str
    shape_a: tuple | None
    shape_b: tuple | None
    dtype_a: str | None
    dtype_b: str | None
    bit_identical: bool
    max_abs: float | None
    rel_error: float | None
    aligned: str | None = None


@dataclass(frozen=True)
class Tolerances:
    """What `exceeds`/`findings` accept. The defaults demand exact equality.

    `allow_dtype_change`: a tensor whose dtype differs but whose values are within tolerance passes.
    `max_kl`: None means KL is reported but not judged.
    """

    max_abs: float = 0.0
    rel_error: float = 0.0
    logits_max_abs: float = 0.0
    min_top1: float = 1.0
    allow_dtype_change: bool = False
    max_kl: float | None = None


@dataclass
class Comparison:
    """Every tensor's `TensorDiff` (candidate `a` against reference `b`) and, when both sides were
    models, their outputs on the probe batch; judged against `Tolerances`."""

    tensors: list[TensorDiff]
    output: OutputDiff | None
    output_note: str | None = None  # why outputs were not compared although both sides are models

    # -- verdicts ---------------------------------------------------------------------------------

    def identical(self) -> bool:
        """Every tensor bit-identical and, when outputs were compared, identical logits."""
        if not all(t.status == "identical" and t.bit_identical for t in self.tensors):
            return False
        if self.output is not None:
            o = self.output
            return o.logits_max_abs == 0.0 and o.top1_agreement == 1.0
        return True

    def exceeds(self, tolerances: Tolerances) -> list[TensorDiff]:
        """Tensors outside `tolerances`, worst first (missing and shape first, then by rel_error)."""
        bad = [t for t in self.tensors if tensor_fails(t, tolerances)]
        return sorted(bad, key=_badness, reverse=True)

    def logits_fail(self, tolerances: Tolerances) -> bool:
        o = self.output
        if o is None:
            return False
        if not (o.logits_max_abs <= tolerances.logits_max_abs):  # NaN fails
            return True
        if not (o.top1_agreement >= tolerances.min_top1):
            return True
        return tolerances.max_kl is not None and not (o.kl_divergence <= tolerances.max_kl)

    # -- report ---------------------------------------------------------------------------------

    def findings(self, prefix: str, tolerances: Tolerances | None = None, *, max_listed: int = 20) -> list[Finding]:
        """Findings for checks `{prefix}_keys`, `{prefix}_tensors` and (when outputs were compared)
        `{prefix}_logits`. A failing check gives one error summary (key None) naming the worst
        tensors, plus one error per failing tensor (key = tensor name) for the worst `max_listed`;
        a passing check gives one info finding."""
        tol = tolerances or Tolerances()
        return (
            self._key_findings(f"{prefix}_keys", max_listed)
            + self._tensor_findings(f"{prefix}_tensors", tol, max_listed)
            + self._logits_findings(f"{prefix}_logits", tol)
        )

    def _key_findings(self, check: str, max_listed: int) -> list[Finding]:
        only_a = [t.name for t in self.tensors if t.status == "only_a"]
        only_b = [t.name for t in self.tensors if t.status == "only_b"]
        if not (only_a or only_b):
            return [Finding(check=check, severity="info", message=f"all {len(self.tensors)} tensor names match")]
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in A: {abbreviate_names(only_a)}")
        if only_b:
            parts.append(f"{len(only_b)} only in B: {abbreviate_names(only_b)}")
        out = [Finding(check=check, severity="error", message="; ".join(parts))]
        only_a_set = set(only_a)
        for n in (only_a + only_b)[:max_listed]:
            side = "A" if n in only_a_set else "B"
            out.append(Finding(check=check, severity="error", key=n, message=f"{n}: only in {side}"))
        return out

    def _tensor_findings(self, check: str, tol: Tolerances, max_listed: int) -> list[Finding]:
        both = [t for t in self.tensors if t.status not in ("only_a", "only_b")]
        bad = [t for t in self.exceeds(tol) if t.status not in ("only_a", "only_b")]
        if bad:
            worst = "; ".join(_describe(t) for t in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            out = [
                Finding(
                    check=check,
                    severity="error",
                    message=(f"{len(bad)} of {len(both)} tensors differ beyond {_tol_text(tol)}: {worst}{more}"),
                )
            ]
            for t in bad[:max_listed]:
                out.append(Finding(check=check, severity="error", key=t.name, message=_describe(t)))
            return out
        exact = sum(1 for t in both if t.bit_identical)
        worst_t = max(both, key=lambda t: t.max_abs or 0.0, default=None)
        tail = ""
        if worst_t is not None and not worst_t.bit_identical:
            tail = f"; largest difference {worst_t.name} (max abs {format_number(worst_t.max_abs)})"
        return [
            Finding(
                check=check,
                severity="info",
                message=(f"{len(both)} tensors within {_tol_text(tol)} ({exact} bit-identical){tail}"),
            )
        ]

    def _logits_findings(self, check: str, tol: Tolerances) -> list[Finding]:
        if self.output is None:
            if not self.output_note:
                return []
            return [Finding(check=check, severity="warning", message=f"outputs not compared: {self.output_note}")]
        o = self.output
        text = (
            f"logits max abs {format_number(o.logits_max_abs)}, KL(B||A) {format_number(o.kl_divergence)}, "
            f"top-1 agreement {o.top1_agreement:.4f} over {o.positions} positions"
        )
        if not self.logits_fail(tol):
            return [Finding(check=check, severity="info", message=text)]
        lim = f"allowed logits max abs {format_number(tol.logits_max_abs)}, top-1 >= {tol.min_top1}"
        if tol.max_kl is not None:
            lim += f", KL <= {format_number(tol.max_kl)}"
        return [Finding(check=check, severity="error", message=f"{text} ({lim})")]

    def to_json_dict(self) -> dict:
        """Plain data; non-finite floats become the strings "inf"/"-inf"/"nan"."""
        return jsonable(
            {
                "identical": self.identical(),
                "tensors": [asdict(t) for t in self.tensors],
                "output": asdict(self.output) if self.output else None,
                "output_note": self.output_note,
            }
        )


# ------------------------------------------------------------------------------- tensor comparison


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view, so torch.equal compares bits (NaN == NaN when the bits agree)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        size = t.element_size()
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(size)
        if t.dtype.is_complex:
            t = torch.view_as_real(t)
            int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        if t.dim() == 0:
            t = t.reshape(1)
        return t.view(int_dtype)
    return t


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def as_words(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both contiguous tensors as flat views of the widest integer that divides their size and
    alignment: torch.equal's cost is per element, so int64 words compare a bf16 tensor faster than
    int16 ones (a save round trip compares the whole model twice). None when no such view."""
    if not (a.is_contiguous() and b.is_contiguous()) or a.dtype.itemsize == 0:
        return None
    nbytes = a.numel() * a.element_size()
    for size, dtype in _WORDS:
        if size <= a.element_size():
            return None
        if nbytes % size == 0 and a.data_ptr() % size == 0 and b.data_ptr() % size == 0:
            try:
                return (a.reshape(-1).view(torch.uint8).view(dtype), b.reshape(-1).view(torch.uint8).view(dtype))
            except RuntimeError:  # a view torch refuses (storage offset): the element-wise path
                return None
    return None


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN-aware), whatever the devices."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    words = as_words(a, b) if a.device.type == "cpu" else None
    if words is not None:
        return torch.equal(*words)
    return torch.equal(_bits(a), _bits(b))


def _as_f64(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_complex:
        raise TypeError("complex tensors are not supported by value metrics")
    return t.to(device="cpu", dtype=torch.float64)


def value_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max_abs, rel_error) in float64, chunked. Positions where both sides are equal (including
    equal infinities) or both NaN count as 0; a NaN on one side only counts as an infinite difference."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    max_abs = 0.0
    diff_sq = 0.0
    ref_sq = 0.0
    for start in range(0, n, _CHUNK):
        xa = _as_f64(fa[start : start + _CHUNK])
        xb = _as_f64(fb[start : start + _CHUNK])
        na, nb = torch.isnan(xa), torch.isnan(xb)
        same = (xa == xb) | (na & nb)
        d = torch.where(same, torch.zeros_like(xa), (xa - xb).abs())
        d = torch.where(na ^ nb, torch.full_like(d, math.inf), d)
        d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)  # defensive; `same` covers inf == inf
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
        diff_sq += float((d * d).sum())
        cb = torch.where(nb, torch.zeros_like(xb), xb)
        ref_sq += float((cb * cb).sum())
    norm_d, norm_b = math.sqrt(diff_sq), math.sqrt(ref_sq)
    if norm_d == 0.0:
        rel = 0.0
    elif not math.isfinite(norm_d) or norm_b == 0.0:
        rel = math.inf
    else:
        rel = norm_d / norm_b
    return max_abs, rel


def tensor_meta(t: torch.Tensor | None) -> tuple[tuple | None, str | None]:
    """(shape, dtype name without "torch.") as a `TensorDiff` reports them."""
    if t is None:
        return None, None
    return tuple(t.shape), str(t.dtype).removeprefix("torch.")


def diff_tensor(
    name: str,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    *,
    aligned: str | None = None,
    shape_a: tuple | None = None,
    shape_b: tuple | None = None,
) -> TensorDiff:
    """Compare one pair (already layout-aligned). `shape_a`/`shape_b` override the reported shapes
    (the stored ones, when a side was transposed)."""
    sa, da = tensor_meta(a)
    sb, db = tensor_meta(b)
    sa, sb = shape_a or sa, shape_b or sb
    if a is None or b is None:
        return TensorDiff(name, "only_b" if a is None else "only_a", sa, sb, da, db, False, None, None)
    if tuple(a.shape) != tuple(b.shape):
        return TensorDiff(name, "shape", sa, sb, da, db, False, None, None, aligned)
    for t in (a, b):
        if t.device.type == "meta":
            raise ValueError(f"{name}: tensor is on the meta device (offloaded?); materialize it before comparing")
    same_bits = bit_equal(a, b)
    if same_bits:
        return TensorDiff(name, "identical", sa, sb, da, db, True, 0.0, 0.0, aligned)
    max_abs, rel = value_stats(a, b)
    status = "dtype" if a.dtype != b.dtype else "different"
    return TensorDiff(name, status, sa, sb, da, db, False, max_abs, rel, aligned)


def compare_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[TensorDiff]:
    """Raw, name-by-name comparison, no layout alignment. Order: a's names, then names only in b."""
    out = []
    for name in union_names(a, b):
        out.append(diff_tensor(name, a[name] if name in a else None, b[name] if name in b else None))
    return out


def union_names(a: Mapping, b: Mapping) -> list[str]:
    """a's names, then b's names not in a."""
    names = list(a.keys())
    seen = set(names)
    names += [k for k in b.keys() if k not in seen]
    return names


# ---------------------------------------------------------------------------------- verdicts


def tensor_fails(t: TensorDiff, tol: Tolerances) -> bool:
    """Is `t` outside `tol`? Missing and shape mismatches always are; NaN metrics are."""
    if t.status in ("only_a", "only_b", "shape"):
        return True
    if t.status == "identical":
        return False
    if t.status == "dtype" and not tol.allow_dtype_change:
        return True
    return not (t.max_abs <= tol.max_abs) or not (t.rel_error <= tol.rel_error)  # NaN fails


def _badness(t: TensorDiff) -> tuple:
    rank = {"only_a": 3, "only_b": 3, "shape": 2}.get(t.status, 0)
    return (rank, t.rel_error if t.rel_error is not None else 0.0, t.max_abs or 0.0)


def format_number(x: float | None) -> str:
    """A metric as reports show it: "-" for None, 3 significant digits, exponent outside [1e-3, 1e4)."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.3e}"


def abbreviate_names(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _tol_text(tol: Tolerances) -> str:
    if tol.max_abs == 0 and tol.rel_error == 0:
        return "exact equality"
    return f"max abs {format_number(tol.max_abs)} and rel error {format_number(tol.rel_error)}"


def _describe(t: TensorDiff) -> str:
    if t.status == "shape":
        return f"{t.name}: shape {t.shape_a} vs {t.shape_b}"
    if t.status in ("only_a", "only_b"):
        return f"{t.name}: only in {'A' if t.status == 'only_a' else 'B'}"
    text = f"{t.name}: max abs diff {format_number(t.max_abs)}, rel error {format_number(t.rel_error)}"
    if t.status == "dtype":
        text += f" (dtype {t.dtype_a} vs {t.dtype_b})"
    return text


def jsonable(x):
    """`x` with non-finite floats as the strings "inf"/"-inf"/"nan" (JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


__all__ = [
    "STATUSES",
    "TensorDiff",
    "Tolerances",
    "Comparison",
    "bit_equal",
    "as_words",
    "value_stats",
    "tensor_meta",
    "diff_tensor",
    "compare_tensors",
    "union_names",
    "tensor_fails",
    "format_number",
    "abbreviate_names",
    "jsonable",
]
