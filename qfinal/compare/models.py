"""`compare_models`: two models (or mappings of tensors) side by side, names aligned and
Conv1D/Linear layouts lined up, then their outputs on the probe batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qfinal.compare.outputs import accepts, output_metrics, probe_batch, probe_logits, vocab_size
from qfinal.compare.tensors import Comparison, TensorDiff, diff_tensor, tensor_meta, union_names
from qfinal.compare.views import DequantView, Layout, is_model


def _side(x, dequantize: bool, dtype) -> tuple[Mapping[str, torch.Tensor], Layout | None]:
    if is_model(x):
        view = DequantView(x, dtype if dequantize else None, dequantize)
        return view, view.layout
    if isinstance(x, Mapping):
        return x, None
    raise TypeError(f"expected a torch.nn.Module or a mapping of tensors, got {type(x).__name__}")


def _align(name: str, ta: torch.Tensor, tb: torch.Tensor, la: Layout | None, lb: Layout | None):
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


def compare_models(
    a,
    b,
    *,
    dequantize: bool = True,
    probe: dict | None = None,
    outputs: bool = True,
    dtype: torch.dtype | None = torch.float32,
    reference_logits: torch.Tensor | None = None,
    same_file_bytes: Mapping[str, tuple] | None = None,
) -> Comparison:
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
    ma, la = _side(a, dequantize, dtype)
    mb, lb = _side(b, dequantize, dtype)
    diffs = _tensor_diffs(ma, mb, la, lb, same_file_bytes)
    output, note = None, None
    if outputs and is_model(a) and is_model(b):
        output, note = _outputs(a, b, probe, reference_logits)
    return Comparison(tensors=diffs, output=output, output_note=note)


def _tensor_diffs(ma, mb, la: Layout | None, lb: Layout | None, same_file_bytes) -> list[TensorDiff]:
    """One `TensorDiff` per name of either side, reading one pair of tensors at a time."""
    from qfinal.checkpoint.residency import FileViews

    diffs = []
    views = FileViews() if same_file_bytes else None
    try:
        for name in union_names(ma, mb):
            ta = ma[name] if name in ma else None
            tb = mb[name] if name in mb else None
            if ta is None or tb is None:
                diffs.append(diff_tensor(name, ta, tb))
                continue
            xa, xb, aligned = _align(name, ta, tb, la, lb)
            known = same_file_bytes.get(name) if same_file_bytes else None
            if (
                known is not None
                and aligned is None
                and xa.dtype == xb.dtype
                and xa.shape == xb.shape
                and views.locate(xa) == known
            ):
                sa, da = tensor_meta(xa)
                diffs.append(TensorDiff(name, "identical", sa, sa, da, da, True, 0.0, 0.0, None))
            else:
                diffs.append(
                    diff_tensor(name, xa, xb, aligned=aligned, shape_a=tuple(ta.shape), shape_b=tuple(tb.shape))
                )
            del ta, tb, xa, xb
    finally:
        if views is not None:
            views.close()
    return diffs


def _outputs(a, b, probe: dict | None, reference_logits: torch.Tensor | None):
    """(output metrics, None), or (None, why the outputs could not be compared)."""
    if probe is None:
        va, vb = vocab_size(a), vocab_size(b)
        probe = probe_batch(b if va is None or (vb is not None and vb < va) else a)
    if not (accepts(a, probe) and accepts(b, probe)):
        return None, f"a model's forward does not accept the probe inputs ({', '.join(probe)})"
    lga = probe_logits(a, probe)
    lgb = reference_logits if reference_logits is not None else probe_logits(b, probe)
    if lga.shape != lgb.shape:
        return None, f"logits shapes differ: {tuple(lga.shape)} vs {tuple(lgb.shape)}"
    return output_metrics(lga, lgb), None


__all__ = ["compare_models"]
