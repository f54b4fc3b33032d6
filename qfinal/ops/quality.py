"""`qfinal load --quality`: how much each quantized weight lost, layer by layer.

After the pipeline has quantized a float checkpoint, every bitsandbytes module's weight is
dequantized with bnb's own function and compared with the original float tensor, read from the
checkpoint's safetensors file (via the pipeline's inventory: `inventory.tensors[key].file` under
the source folder), one tensor at a time. No second model is loaded. The arithmetic is
`qfinal.compare.quality_by_layer`: rel_error = ||dequant - original||_F / ||original||_F and the
max abs difference, in float64, Conv1D originals transposed to Linear layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

from qfinal.checkpoint.reader import TensorReader
from qfinal.compare.layers import LayerQuality, quality_by_layer
from qfinal.compare.tensors import format_number, jsonable
from qfinal.compare.views import quant_kind
from qfinal.report import Finding


class QualityUnavailable(Exception):
    """Why no per-layer quality can be computed for this load (a warning, not an input error)."""


class CheckpointTensors(Mapping):
    """Model-side weight name -> the original tensor, read lazily from the checkpoint's safetensors.

    Names are matched as stored, or with the model's `base_model_prefix` added or removed (a bare
    `GPT2Model` checkpoint read into `GPT2LMHeadModel`). At most two files are open at a time."""

    def __init__(self, inventory, folder: Path, prefix: str = ""):
        self.inventory = inventory
        self.folder = Path(folder)
        self.prefix = prefix or ""
        self._reader = TensorReader.for_inventory(inventory, self.folder)

    def key_for(self, name: str) -> str | None:
        tensors = self.inventory.tensors
        if name in tensors:
            return name
        p = self.prefix
        if p:
            if name.startswith(p + ".") and name[len(p) + 1 :] in tensors:
                return name[len(p) + 1 :]
            if f"{p}.{name}" in tensors:
                return f"{p}.{name}"
        return None

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self.key_for(name) is not None

    def __getitem__(self, name: str):
        key = self.key_for(name)
        if key is None:
            raise KeyError(name)
        return self._reader.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.inventory.tensors)

    def __len__(self) -> int:
        return len(self.inventory.tensors)

    def close(self) -> None:
        self._reader.close()


def quantized_modules(model) -> list[str]:
    return [name for name, mod in model.named_modules() if quant_kind(mod) is not None]


def quality_report(result) -> list[LayerQuality]:
    """Per quantized module of `result.model` (a `qfinal.load` result), its error against the
    checkpoint's original float weight. [] when nothing was quantized. Raises QualityUnavailable
    when the originals cannot be read (a pre-quantized checkpoint, pickle weights, names the
    checkpoint does not hold)."""
    ctx = result.context
    model = result.model
    names = quantized_modules(model)
    if not names:
        return []
    quantizer = ctx.hf_quantizer
    if quantizer is not None and getattr(quantizer, "pre_quantized", False):
        raise QualityUnavailable("the checkpoint is already quantized: it holds no float originals to compare with")
    inventory = ctx.inventory
    if inventory is None or inventory.format != "safetensors":
        raise QualityUnavailable("the original weights are not in safetensors files")
    originals = CheckpointTensors(inventory, ctx.source.folder, getattr(model, "base_model_prefix", "") or "")
    try:
        missing = [f"{n}.weight" for n in names if f"{n}.weight" not in originals]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise QualityUnavailable(
                f"the checkpoint holds no tensor named like {len(missing)} quantized weight(s): {shown}"
            )
        try:
            return quality_by_layer(originals, model)
        except ValueError as err:
            raise QualityUnavailable(str(err)) from None
    finally:
        originals.close()


def summary(rows: list[LayerQuality]) -> str:
    finite = sorted(r.rel_error for r in rows if math.isfinite(r.rel_error))
    if not finite:
        return f"{len(rows)} quantized module(s)"
    worst = max(rows, key=lambda r: r.rel_error if math.isfinite(r.rel_error) else -1.0)
    median = (
        finite[len(finite) // 2] if len(finite) % 2 else (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2
    )
    quants = ", ".join(sorted({r.quant for r in rows}))
    return (
        f"{len(rows)} {quants} module(s) vs the checkpoint's float weights: "
        f"rel error min {format_number(finite[0])}, median {format_number(median)}, "
        f"max {format_number(finite[-1])} ({worst.name})"
    )


def add_quality(result) -> list[LayerQuality]:
    """Run `quality_report` and record it in `result.report`: rows in `extra["quality"]` (a list of
    LayerQuality dicts, [] when unavailable), one `quality` finding (info; warning when unavailable or
    an error is not finite). Returns the rows."""
    report = result.report
    try:
        rows = quality_report(result)
    except QualityUnavailable as why:
        report.extra["quality"] = []
        report.findings.append(Finding(check="quality", severity="warning", message=f"quality not measured: {why}"))
        rows = None
    else:
        report.extra["quality"] = [jsonable(asdict(r)) for r in rows]
        if not rows:
            report.findings.append(
                Finding(
                    check="quality", severity="info", message="nothing was quantized: no per-layer quality to measure"
                )
            )
        else:
            report.findings.append(Finding(check="quality", severity="info", message=summary(rows)))
            for r in rows:
                if not math.isfinite(r.rel_error):
                    report.findings.append(
                        Finding(
                            check="quality",
                            severity="warning",
                            key=r.name,
                            message=f"{r.name}: relative error is {r.rel_error}",
                        )
                    )
    if "quality" not in report.checks:
        report.checks = [*report.checks, "quality"]
    return rows or []


__all__ = ["quality_report", "add_quality", "CheckpointTensors", "QualityUnavailable", "summary"]
