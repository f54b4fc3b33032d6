"""The one comparison engine: tensors, dequantized values and model outputs.

Used by `qfinal diff A B`, by `qfinal save`'s round-trip proof, by `dequantize --verify` and by
`qfinal load --quality`. Nothing here prints or exits; renderers read the dataclasses.

Conventions (stable, the tests pin them):

* **Direction.** `b` is the reference, `a` the candidate. `rel_error = ||a - b||_F / ||b||_F` and
  `kl_divergence = mean over positions of KL(p_b || p_a) = sum_v p_b (log p_b - log p_a)`, i.e. the
  information lost when the candidate's next-token distribution stands in for the reference's.
  Call `compare_models(quantized, original)`.
* **Arithmetic.** Every value metric is computed in float64 on CPU, in chunks, so a bf16 or int8
  tensor is never rounded before it is compared. `bit_identical` compares raw bits (NaN-aware:
  identical bits are identical, whatever their value).
* **Common layout.** Linear layout, `(out_features, in_features)`, what `nn.Linear` and bitsandbytes'
  `Linear4bit`/`Linear8bitLt` hold (transformers transposes GPT-2 style `Conv1D` weights when it
  quantizes them). `dequantized_state_dict` transposes every `Conv1D` weight into it. In raw mode
  (`dequantize=False`) tensors keep their stored layout; a `Conv1D` weight is transposed only to
  line up with the other side's known Linear weight (or, for a plain mapping whose layout is unknown,
  when only the transposed shape fits). A plain mapping is taken to be in the layout a model would
  present in the same mode: `dequantized_state_dict` output for `dequantize=True`, `raw_state_dict`
  output for `dequantize=False`.
* **Tied weights.** `raw_state_dict` is what `save_pretrained` persists, so tied aliases are dropped
  the way transformers drops them (`lm_head.weight` when it is tied to the embeddings);
  `dequantized_state_dict` uses the same key set, minus bitsandbytes' auxiliary keys.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from qfinal.report import Finding

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

_CHUNK = 1 << 22  # elements per float64 chunk (32 MiB per side)

STATUSES = ("identical", "different", "only_a", "only_b", "shape", "dtype")


# --------------------------------------------------------------------------------------------- data


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


@dataclass
class OutputDiff:
    """Next-token outputs of candidate `a` against reference `b` on one probe batch.

    `kl_divergence` is KL(p_b || p_a) per position (natural log), averaged over all batch x sequence
    positions (decoder positions for encoder-decoders). All in float64.
    """

    logits_max_abs: float
    kl_divergence: float
    top1_agreement: float
    positions: int = 0


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
        bad = [t for t in self.tensors if _tensor_fails(t, tolerances)]
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
        out: list[Finding] = []

        only_a = [t.name for t in self.tensors if t.status == "only_a"]
        only_b = [t.name for t in self.tensors if t.status == "only_b"]
        if only_a or only_b:
            parts = []
            if only_a:
                parts.append(f"{len(only_a)} only in A: {_names(only_a)}")
            if only_b:
                parts.append(f"{len(only_b)} only in B: {_names(only_b)}")
            out.append(Finding(check=f"{prefix}_keys", severity="error", message="; ".join(parts)))
            only_a_set = set(only_a)
            for n in (only_a + only_b)[:max_listed]:
                side = "A" if n in only_a_set else "B"
                out.append(Finding(check=f"{prefix}_keys", severity="error", key=n, message=f"{n}: only in {side}"))
        else:
            out.append(Finding(check=f"{prefix}_keys", severity="info",
                               message=f"all {len(self.tensors)} tensor names match"))

        both = [t for t in self.tensors if t.status not in ("only_a", "only_b")]
        bad = [t for t in self.exceeds(tol) if t.status not in ("only_a", "only_b")]
        check = f"{prefix}_tensors"
        if bad:
            worst = "; ".join(_describe(t) for t in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            out.append(Finding(check=check, severity="error", message=(
                f"{len(bad)} of {len(both)} tensors differ beyond {_tol_text(tol)}: {worst}{more}")))
            for t in bad[:max_listed]:
                out.append(Finding(check=check, severity="error", key=t.name, message=_describe(t)))
        else:
            exact = sum(1 for t in both if t.bit_identical)
            worst_t = max(both, key=lambda t: t.max_abs or 0.0, default=None)
            tail = ""
            if worst_t is not None and not worst_t.bit_identical:
                tail = f"; largest difference {worst_t.name} (max abs {_num(worst_t.max_abs)})"
            out.append(Finding(check=check, severity="info", message=(
                f"{len(both)} tensors within {_tol_text(tol)} ({exact} bit-identical){tail}")))

        if self.output is not None:
            o = self.output
            text = (f"logits max abs {_num(o.logits_max_abs)}, KL(B||A) {_num(o.kl_divergence)}, "
                    f"top-1 agreement {o.top1_agreement:.4f} over {o.positions} positions")
            if self.logits_fail(tol):
                lim = f"allowed logits max abs {_num(tol.logits_max_abs)}, top-1 >= {tol.min_top1}"
                if tol.max_kl is not None:
                    lim += f", KL <= {_num(tol.max_kl)}"
                out.append(Finding(check=f"{prefix}_logits", severity="error", message=f"{text} ({lim})"))
            else:
                out.append(Finding(check=f"{prefix}_logits", severity="info", message=text))
        elif self.output_note:
            out.append(Finding(check=f"{prefix}_logits", severity="warning",
                               message=f"outputs not compared: {self.output_note}"))
        return out

    def to_json_dict(self) -> dict:
        """Plain data; non-finite floats become the strings "inf"/"-inf"/"nan"."""
        return _jsonable({"identical": self.identical(), "tensors": [asdict(t) for t in self.tensors],
                          "output": asdict(self.output) if self.output else None,
                          "output_note": self.output_note})


@dataclass
class LayerQuality:
    """One bitsandbytes-quantized module against its original float weight (`load --quality`).

    `layer` is the first `.N.` index in the name (`model.layers.3.self_attn.q_proj` -> 3,
    `transformer.h.3.attn.c_attn` -> 3), `stack` what precedes it (`model.layers`, `encoder.block`),
    `module_type` the last name component (`q_proj`, `c_attn`, `wi`). rel_error is
    ||dequant - original|| / ||original|| in float64 (Linear layout).
    """

    name: str
    layer: int | None
    module_type: str
    rel_error: float
    max_abs: float
    quant: str  # nf4 | fp4 | int8
    shape: tuple
    stack: str | None = None


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


def _as_words(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both contiguous tensors as flat views of the widest integer that divides their size and
    alignment: torch.equal's cost is per element, so int64 words compare a bf16 tensor about twice
    as fast as int16 (a save round trip compares the whole model twice). None when no such view."""
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
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    words = _as_words(a, b) if a.device.type == "cpu" else None
    if words is not None:
        return torch.equal(*words)
    return torch.equal(_bits(a), _bits(b))


def _as_f64(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_complex:
        raise TypeError("complex tensors are not supported by value metrics")
    return t.to(device="cpu", dtype=torch.float64)


def _value_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max_abs, rel_error) in float64, chunked. Positions where both sides are equal (including
    equal infinities) or both NaN count as 0; a NaN on one side only counts as an infinite difference."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    max_abs = 0.0
    diff_sq = 0.0
    ref_sq = 0.0
    for start in range(0, n, _CHUNK):
        xa = _as_f64(fa[start:start + _CHUNK])
        xb = _as_f64(fb[start:start + _CHUNK])
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


def _meta(t: torch.Tensor | None) -> tuple[tuple | None, str | None]:
    if t is None:
        return None, None
    return tuple(t.shape), str(t.dtype).removeprefix("torch.")


def diff_tensor(name: str, a: torch.Tensor | None, b: torch.Tensor | None, *, aligned: str | None = None,
                shape_a: tuple | None = None, shape_b: tuple | None = None) -> TensorDiff:
    """Compare one pair (already layout-aligned). `shape_a`/`shape_b` override the reported shapes
    (the stored ones, when a side was transposed)."""
    sa, da = _meta(a)
    sb, db = _meta(b)
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
    max_abs, rel = _value_stats(a, b)
    status = "dtype" if a.dtype != b.dtype else "different"
    return TensorDiff(name, status, sa, sb, da, db, False, max_abs, rel, aligned)


def compare_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[TensorDiff]:
    """Raw, name-by-name comparison, no layout alignment. Order: a's names, then names only in b."""
    out = []
    for name in _union(a, b):
        out.append(diff_tensor(name, a[name] if name in a else None, b[name] if name in b else None))
    return out


def _union(a: Mapping, b: Mapping) -> list[str]:
    names = list(a.keys())
    seen = set(names)
    names += [k for k in b.keys() if k not in seen]
    return names


# ----------------------------------------------------------------------------------- state dicts


def _bnb():
    """bitsandbytes, only if something already imported it: a module cannot be a bnb layer
    otherwise, and importing it for a plain model costs about 1.5 s (its torch.compile'd ops)."""
    return sys.modules.get("bitsandbytes")


def _conv1d_cls():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _quant_kind(module) -> str | None:
    """'4bit', '8bit' or None for a bitsandbytes linear holding quantized data."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit" if getattr(module.weight, "quant_state", None) is not None else None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit" if module.weight.dtype == torch.int8 else None
    return None


def _quant_label(module) -> str:
    kind = _quant_kind(module)
    if kind == "8bit":
        return "int8"
    if kind == "4bit":
        return str(getattr(module.weight.quant_state, "quant_type", "4bit"))
    return "none"


def _int8_scb(module) -> torch.Tensor:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError("Linear8bitLt module has int8 weights but no SCB statistics")
    return scb


def _undo_cpu_packing(module) -> None:
    """Bring a Linear4bit whose weight bnb repacked for its AVX512-BF16 CPU kernel back to the
    standard packed format, in place, with bnb's own inverse -- exactly what bnb's
    `_save_to_state_dict` (so `model.state_dict()` and `save_pretrained`) does. `dequantize_4bit` is
    only defined on the standard format."""
    w = module.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)


@contextmanager
def bnb_cpu_repack_disabled(model) -> Iterator[None]:
    """Forward passes inside this block leave bitsandbytes 4-bit weights as they are.

    bitsandbytes >= 0.48 repacks a Linear4bit's weight on its first eval forward on a CPU with
    AVX512-BF16, rounding absmax to bfloat16 (and dropping double quantization); the next
    `state_dict()` converts back and re-quantizes, so a forward would change what `save` persists and
    the logits of later forwards. qfinal measures, so it must not modify: this turns the repacking off
    (bnb then dequantizes and matmuls in the standard format) and restores the flags afterwards.
    Weights already repacked before the block stay repacked."""
    bnb = _bnb()
    saved = []
    if bnb is not None:
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit) and getattr(mod, "support_avx512bf16_for_cpu", False):
                saved.append(mod)
                mod.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for mod in saved:
            mod.support_avx512bf16_for_cpu = True


def dequantize_module_weight(module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a quantized linear's weight, (out, in), in the dtype bnb
    returns (the original dtype for 4-bit, float32 for int8). Non-quantized weights come back as-is.
    A 4-bit weight in bnb's CPU-kernel layout is first converted back in place (see
    `_undo_cpu_packing`)."""
    bnb = _bnb()
    kind = _quant_kind(module)
    w = module.weight
    if kind == "4bit":
        _undo_cpu_packing(module)
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if kind == "8bit":
        return bnb.functional.int8_vectorwise_dequant(w.data, _int8_scb(module))
    return w.data


def _remove_tied(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Drop tied aliases exactly as `save_pretrained` does (same transformers function)."""
    if not hasattr(model, "config"):
        return sd
    from qfinal.compat.transformers import remove_tied_weights

    return remove_tied_weights(sd, model)


def raw_state_dict(model) -> dict[str, torch.Tensor]:
    """What `save_pretrained` would persist, by model-side name: `model.state_dict()` (bitsandbytes'
    hooks add packed weights, absmax, quant_map, nested_absmax/nested_quant_map, the
    `quant_state.bitsandbytes__*` blob, SCB and weight_format), minus tied aliases. Names are the
    model's own, before transformers' save-time key renaming (`revert_weight_conversion`), which is a
    no-op for most architectures."""
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return _remove_tied(sd, model)


def _module_index(model) -> dict[str, Any]:
    return dict(model.named_modules())


def _bnb_aux(name: str, key: str) -> bool:
    """Is `key` an auxiliary bitsandbytes entry of module `name` (not its weight/bias)?"""
    if not key.startswith(name + "."):
        return False
    rest = key[len(name) + 1:]
    return rest not in ("weight", "bias")


class _Layout:
    """Per weight name: 'linear' | 'conv1d' | 'packed' for weights of linear-like modules."""

    def __init__(self):
        self.kind: dict[str, str] = {}
        self.conv1d_source: set[str] = set()  # Conv1D now, or bnb linears replacing a Conv1D


class _DequantView(Mapping):
    """Lazily dequantized, layout-aligned values of a model; one tensor materialized at a time."""

    def __init__(self, model, dtype: torch.dtype | None, dequantize: bool):
        self.model = model
        self.dtype = dtype
        self.dequantize = dequantize
        self.layout = _Layout()
        raw = raw_state_dict(model)
        modules = _module_index(model)
        conv1d = _conv1d_cls()
        self._special: dict[str, Any] = {}  # weight key -> module needing dequant/transpose
        drop: set[str] = set()
        for mname, mod in modules.items():
            wkey = f"{mname}.weight" if mname else "weight"
            src = getattr(mod, "source_cls", None)
            is_conv = isinstance(mod, conv1d)
            if is_conv or (isinstance(src, type) and issubclass(src, conv1d)):
                self.layout.conv1d_source.add(wkey)
            kind = _quant_kind(mod)
            if kind is not None:
                if dequantize:
                    self._special[wkey] = mod
                    drop |= {k for k in raw if _bnb_aux(mname, k)}
                    self.layout.kind[wkey] = "linear"
                else:
                    self.layout.kind[wkey] = "packed" if kind == "4bit" else "linear"
            elif is_conv:
                if dequantize:
                    self._special[wkey] = mod
                    self.layout.kind[wkey] = "linear"
                else:
                    self.layout.kind[wkey] = "conv1d"
            elif isinstance(mod, torch.nn.Linear):
                self.layout.kind[wkey] = "linear"
        self._raw = raw
        self._keys = [k for k in raw if k not in drop]
        self._keyset = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        if not self.dequantize:
            return self._raw[key]
        mod = self._special.get(key)
        if mod is None:
            t = self._raw[key]
        elif _quant_kind(mod) is not None:
            t = dequantize_module_weight(mod).detach()
        else:  # Conv1D: (in, out) -> Linear layout (out, in)
            t = self._raw[key].t()
        if self.dtype is not None and t.dtype.is_floating_point:
            t = t.to(self.dtype)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def dequantized_state_dict(model, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Float values per persisted parameter/buffer name: bnb `Linear4bit` weights through
    `bitsandbytes.functional.dequantize_4bit`, `Linear8bitLt` through `int8_vectorwise_dequant`
    (CB * SCB / 127), both in Linear layout (out, in); `Conv1D` weights transposed to Linear layout
    (out, in); bnb auxiliary keys dropped; floating tensors cast to `dtype` (None keeps each dtype),
    others as-is."""
    view = _DequantView(model, dtype, dequantize=True)
    return {k: view[k] for k in view}


# ---------------------------------------------------------------------------------------- probing


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _vocab(model) -> int | None:
    cfg = _text_config(model)
    v = getattr(cfg, "vocab_size", None) if cfg is not None else None
    return int(v) if v else None


PROBE_SEED = 0
PROBE_BATCH = 2
PROBE_LEN = 16
PROBE_MAX_ID = 32000


def probe_batch(model, batch: int = PROBE_BATCH, length: int = PROBE_LEN) -> dict:
    """The fixed probe batch: a CPU `torch.Generator` seeded 0 draws `input_ids` of shape
    `batch` x `length` (default 2 x 16; fewer positions if the model's max positions is smaller)
    uniformly in [0, min(vocab, 32000)); encoder-decoders also get `decoder_input_ids`, the next
    draw of the same shape from the same generator. No attention mask (all positions attend).
    Same model config and size -> same tensors, on any machine."""
    vocab = _vocab(model) or PROBE_MAX_ID
    high = max(1, min(vocab, PROBE_MAX_ID))
    cfg = _text_config(model)
    for attr in ("max_position_embeddings", "n_positions"):
        m = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(m, int) and m > 0:
            length = min(length, m)
    g = torch.Generator().manual_seed(PROBE_SEED)
    out = {"input_ids": torch.randint(0, high, (batch, length), generator=g)}
    if _is_encoder_decoder(model):
        out["decoder_input_ids"] = torch.randint(0, high, (batch, length), generator=g)
    return out


def _accepts(model, probe: Mapping) -> bool:
    import inspect

    fwd = getattr(model, "forward", None)
    if fwd is None:
        return False
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(k in params for k in probe)


def _device_of(model) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def probe_logits(model, probe: Mapping) -> torch.Tensor:
    """Logits of `model` on `probe`, float64 on CPU, shape (batch, positions, vocab). Runs in eval
    mode under `bnb_cpu_repack_disabled`, so the model's weights are not modified."""
    dev = _device_of(model)
    inputs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in probe.items()}
    was_training = model.training
    model.eval()
    try:
        with bnb_cpu_repack_disabled(model):
            out = model(**inputs)
    finally:
        if was_training:
            model.train()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().to("cpu", torch.float64)


def output_metrics(logits_a: torch.Tensor, logits_b: torch.Tensor) -> OutputDiff:
    """Metrics of candidate logits `a` against reference `b` (both (..., vocab)), float64."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    la = logits_a.to(torch.float64).reshape(-1, logits_a.shape[-1])
    lb = logits_b.to(torch.float64).reshape(-1, logits_b.shape[-1])
    max_abs, _ = _value_stats(la, lb)
    lpa, lpb = torch.log_softmax(la, dim=-1), torch.log_softmax(lb, dim=-1)
    pb = lpb.exp()
    terms = torch.where(pb > 0, pb * (lpb - lpa), torch.zeros_like(pb))
    kl = terms.sum(dim=-1)  # per position
    top1 = (la.argmax(dim=-1) == lb.argmax(dim=-1)).to(torch.float64)
    n = la.shape[0]
    return OutputDiff(logits_max_abs=max_abs, kl_divergence=float(kl.mean()) if n else 0.0,
                      top1_agreement=float(top1.mean()) if n else 1.0, positions=n)


def output_diff(model_a, model_b, probe) -> OutputDiff:
    """Forward both models on `probe` and compare next-token outputs (`b` = reference)."""
    return output_metrics(probe_logits(model_a, probe), probe_logits(model_b, probe))


# -------------------------------------------------------------------------------- model comparison


def _is_model(x) -> bool:
    return isinstance(x, torch.nn.Module)


def _side(x, dequantize: bool, dtype) -> tuple[Mapping[str, torch.Tensor], _Layout | None]:
    if _is_model(x):
        view = _DequantView(x, dtype if dequantize else None, dequantize)
        return view, view.layout
    if isinstance(x, Mapping):
        return x, None
    raise TypeError(f"expected a torch.nn.Module or a mapping of tensors, got {type(x).__name__}")


def _align(name: str, ta: torch.Tensor, tb: torch.Tensor, la: _Layout | None, lb: _Layout | None):
    """Transpose one side of a Conv1D-sourced 2-D weight so both are in the same layout."""
    conv = (la is not None and name in la.conv1d_source) or (lb is not None and name in lb.conv1d_source)
    if not conv or ta.dim() != 2 or tb.dim() != 2:
        return ta, tb, None
    ka = la.kind.get(name) if la is not None else None
    kb = lb.kind.get(name) if lb is not None else None
    if "packed" in (ka, kb):
        return ta, tb, None
    t_shape_a = (ta.shape[1], ta.shape[0])
    if ka in ("linear", "conv1d") and kb in ("linear", "conv1d"):
        if ka != kb and tuple(tb.shape) == t_shape_a:
            return (ta.t(), tb, "a") if ka == "conv1d" else (ta, tb.t(), "b")
        return ta, tb, None
    # one side's layout unknown (a plain mapping): only the shape can tell
    if tuple(ta.shape) != tuple(tb.shape) and tuple(tb.shape) == t_shape_a:
        if (ka is None) == (kb is None):
            return ta, tb, None
        return (ta.t(), tb, "a") if ka is None else (ta, tb.t(), "b")
    return ta, tb, None


def compare_models(a, b, *, dequantize: bool = True, probe: dict | None = None, outputs: bool = True,
                   dtype: torch.dtype | None = torch.float32,
                   reference_logits: torch.Tensor | None = None,
                   same_file_bytes: Mapping[str, tuple] | None = None) -> Comparison:
    """Compare candidate `a` with reference `b` (models or mappings of tensors), aligned by name.

    `dequantize=True`: bitsandbytes weights are dequantized with bnb's functions and Conv1D weights
    put in Linear layout (see `dequantized_state_dict`); bnb auxiliary keys are not compared.
    `dequantize=False`: `raw_state_dict` on both sides, bit for bit (Conv1D still aligned against a
    Linear of transposed shape). Outputs are compared on `probe` (default `probe_batch` of the model
    with the smaller vocabulary) when both sides are models whose forward accepts it and `outputs`.
    `reference_logits`: `probe_logits(b, probe)` computed earlier, for a caller that compares
    several candidates with the same reference (one forward of `b` instead of one per candidate).
    `same_file_bytes`: name -> `residency.FileViews.locate` of a tensor already proven
    bit-identical to `b`'s; an `a` tensor at exactly that location holds the same bytes, so it
    is identical without being read (save: the qfinal reload maps the files the transformers
    reload was compared from).
    """
    from qfinal.checkpoint.residency import FileViews

    ma, la = _side(a, dequantize, dtype)
    mb, lb = _side(b, dequantize, dtype)
    diffs = []
    views = FileViews() if same_file_bytes else None
    try:
        for name in _union(ma, mb):
            ta = ma[name] if name in ma else None
            tb = mb[name] if name in mb else None
            if ta is None or tb is None:
                diffs.append(diff_tensor(name, ta, tb))
                continue
            xa, xb, aligned = _align(name, ta, tb, la, lb)
            known = same_file_bytes.get(name) if same_file_bytes else None
            if (known is not None and aligned is None and xa.dtype == xb.dtype and xa.shape == xb.shape
                    and views.locate(xa) == known):
                sa, da = _meta(xa)
                diffs.append(TensorDiff(name, "identical", sa, sa, da, da, True, 0.0, 0.0, None))
            else:
                diffs.append(diff_tensor(name, xa, xb, aligned=aligned, shape_a=tuple(ta.shape),
                                         shape_b=tuple(tb.shape)))
            del ta, tb, xa, xb
    finally:
        if views is not None:
            views.close()

    output, note = None, None
    if outputs and _is_model(a) and _is_model(b):
        if probe is None:
            va, vb = _vocab(a), _vocab(b)
            probe = probe_batch(b if va is None or (vb is not None and vb < va) else a)
        if not (_accepts(a, probe) and _accepts(b, probe)):
            note = f"a model's forward does not accept the probe inputs ({', '.join(probe)})"
        else:
            lga = probe_logits(a, probe)
            lgb = reference_logits if reference_logits is not None else probe_logits(b, probe)
            if lga.shape != lgb.shape:
                note = f"logits shapes differ: {tuple(lga.shape)} vs {tuple(lgb.shape)}"
            else:
                output = output_metrics(lga, lgb)
    return Comparison(tensors=diffs, output=output, output_note=note)


# ------------------------------------------------------------------------------- quality by layer

_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def parse_layer(name: str) -> tuple[str | None, int | None]:
    """(stack, index) from the first numeric name component: 'model.layers.3.mlp' -> ('model.layers', 3)."""
    m = _INDEX.search(name)
    if not m:
        return None, None
    return name[:m.start()] or None, int(m.group(1))


def module_type_of(name: str) -> str:
    """Last non-numeric component of a module name (strip a trailing .weight/.bias for tensors)."""
    parts = [p for p in name.split(".") if p and not p.isdigit()]
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1] if parts else name


def quality_by_layer(original_state_dict, quantized_model) -> list[LayerQuality]:
    """Per bitsandbytes-quantized module of `quantized_model`: the error of bnb's dequantization of
    the packed weight against the original float weight `{module}.weight`.

    `original_state_dict` is a mapping in the float checkpoint's stored layout (Conv1D weights
    (in, out); they are transposed when the quantized module's `source_cls` is Conv1D), or a float
    model (its `dequantized_state_dict`, already Linear layout). Raises ValueError when an original
    weight is missing or its shape does not fit."""
    if _is_model(original_state_dict):
        original: Mapping = _DequantView(original_state_dict, None, dequantize=True)
        native = False
    else:
        original, native = original_state_dict, True
    conv1d = _conv1d_cls()
    rows: list[LayerQuality] = []
    missing: list[str] = []
    for mname, mod in quantized_model.named_modules():
        if _quant_kind(mod) is None:
            continue
        key = f"{mname}.weight"
        if key not in original:
            missing.append(key)
            continue
        ref = original[key]
        deq = dequantize_module_weight(mod).detach()
        src = getattr(mod, "source_cls", None)
        if native and isinstance(src, type) and issubclass(src, conv1d) and ref.dim() == 2 \
                and tuple(ref.shape) == (deq.shape[1], deq.shape[0]):
            ref = ref.t()
        if tuple(ref.shape) != tuple(deq.shape):
            raise ValueError(f"{key}: original shape {tuple(ref.shape)} does not fit the quantized "
                             f"weight's {tuple(deq.shape)}")
        max_abs, rel = _value_stats(deq, ref)
        stack, layer = parse_layer(mname)
        rows.append(LayerQuality(name=mname, layer=layer, module_type=module_type_of(mname), rel_error=rel,
                                 max_abs=max_abs, quant=_quant_label(mod), shape=tuple(deq.shape), stack=stack))
    if missing:
        raise ValueError(f"original weights missing for {len(missing)} quantized modules: {_names(missing)}")
    return rows


# ------------------------------------------------------------------------------------- rendering

_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float, top: float, width: int = 40) -> str:
    """A bar of block characters, `width` cells at `top`, 1/8-cell resolution."""
    if not (top > 0) or not math.isfinite(value) or value <= 0:
        return "█" * width if value == math.inf else ""
    eighths = round(min(value / top, 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_BLOCKS[rest] if rest else "")


def render_rich_bars(rows, console: "Console", *, title: str = "Relative error by layer", width: int = 40) -> None:
    """Print `rich_bars_table`."""
    console.print(rich_bars_table(rows, title=title, width=width))


def rich_bars_table(rows, *, title: str = "Relative error by layer", width: int = 40):
    """Per-row bar chart of relative error (rows: LayerQuality or TensorDiff), bars scaled to the
    largest finite error. Rows without a rel_error are skipped."""
    from rich.table import Table
    from rich.text import Text

    rows = [r for r in rows if getattr(r, "rel_error", None) is not None]
    finite = [r.rel_error for r in rows if math.isfinite(r.rel_error)]
    top = max(finite, default=0.0)
    table = Table(title=title)
    table.add_column("module" if rows and isinstance(rows[0], LayerQuality) else "tensor", overflow="fold")
    table.add_column("layer", justify="right")
    table.add_column("type")
    table.add_column("rel error", justify="right")
    table.add_column("", min_width=width, no_wrap=True)
    for r in rows:
        if isinstance(r, LayerQuality):
            layer, mtype = r.layer, r.module_type
        else:
            layer, mtype = parse_layer(r.name)[1], module_type_of(r.name)
        table.add_row(Text(r.name), "" if layer is None else str(layer), Text(mtype), _num(r.rel_error),
                      Text(bar(r.rel_error, top, width), style="magenta"))
    return table


# -------------------------------------------------------------------------------------- helpers


def _tensor_fails(t: TensorDiff, tol: Tolerances) -> bool:
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


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.3e}"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _tol_text(tol: Tolerances) -> str:
    if tol.max_abs == 0 and tol.rel_error == 0:
        return "exact equality"
    return f"max abs {_num(tol.max_abs)} and rel error {_num(tol.rel_error)}"


def _describe(t: TensorDiff) -> str:
    if t.status == "shape":
        return f"{t.name}: shape {t.shape_a} vs {t.shape_b}"
    if t.status in ("only_a", "only_b"):
        return f"{t.name}: only in {'A' if t.status == 'only_a' else 'B'}"
    text = f"{t.name}: max abs diff {_num(t.max_abs)}, rel error {_num(t.rel_error)}"
    if t.status == "dtype":
        text += f" (dtype {t.dtype_a} vs {t.dtype_b})"
    return text


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


__all__ = [
    "TensorDiff", "OutputDiff", "Comparison", "Tolerances", "LayerQuality", "raw_state_dict",
    "dequantized_state_dict", "dequantize_module_weight", "bnb_cpu_repack_disabled", "compare_tensors", "compare_models",
    "probe_batch", "probe_logits", "output_metrics", "output_diff", "quality_by_layer", "parse_layer",
    "module_type_of", "render_rich_bars", "bar", "bit_equal", "diff_tensor",
]
