"""A self-contained HTML page for a `Comparison` or a `quality_by_layer` result.

No external resources, no JavaScript: inline CSS, tables, and an inline SVG bar chart of relative
error by layer and module type (hover titles come from SVG <title> elements). Every name that comes
from a checkpoint goes through `html.escape`. The page contains no URL at all (the inline <svg> needs
no xmlns in HTML5), so it can be archived as a CI artifact and opened offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from qfinal.compare.layers import LayerQuality, module_type_of, parse_layer
from qfinal.compare.tensors import Comparison, TensorDiff, format_number

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fde8e8}.ok{color:#2a7a2a}.bad{color:#b00020}
.legend span{display:inline-block;margin-right:1rem;font-size:.8rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:middle}
svg text{font-size:11px;font-family:ui-monospace,Menlo,Consolas,monospace}
"""


class _Row:
    __slots__ = ("label", "stack", "layer", "mtype", "value")

    def __init__(self, label, stack, layer, mtype, value):
        self.label, self.stack, self.layer, self.mtype, self.value = label, stack, layer, mtype, value


def _rows_from(obj) -> list[_Row]:
    rows = []
    if isinstance(obj, Comparison):
        for t in obj.tensors:
            if t.rel_error is None:
                continue
            stack, layer = parse_layer(t.name)
            rows.append(_Row(t.name, stack, layer, module_type_of(t.name), t.rel_error))
    else:
        for q in obj:
            rows.append(_Row(q.name, q.stack, q.layer, q.module_type, q.rel_error))

    stacks = {st: i for i, st in enumerate(dict.fromkeys(r.stack for r in rows))}

    def key(r: _Row):  # stacks in model order, then layer index; stable within a layer
        return (r.layer is None, stacks[r.stack], r.layer if r.layer is not None else -1)

    return sorted(rows, key=key)


def svg_chart(rows: list[_Row], *, width: int = 860, bar_h: int = 14, label_w: int = 330) -> str:
    """Horizontal bars, one per tensor/module, grouped by layer (alternating bands), colored by
    module type, scaled to the largest finite error; an infinite error draws a full red bar."""
    if not rows:
        return "<p>No comparable tensors to chart.</p>"
    types = list(dict.fromkeys(r.mtype for r in rows))
    color = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(types)}
    finite = [r.value for r in rows if math.isfinite(r.value)]
    top = max(finite, default=0.0)
    plot_w = width - label_w - 90
    top_pad = 18
    height = top_pad + len(rows) * bar_h + 6
    out = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="relative error by layer and module type">'
    ]
    out.append(
        f'<text x="{label_w}" y="12">0</text>'
        f'<text x="{label_w + plot_w}" y="12" text-anchor="end">{escape(format_number(top))}</text>'
    )
    group, band = None, 0
    for i, r in enumerate(rows):
        y = top_pad + i * bar_h
        g = (r.stack, r.layer)
        if g != group:
            group, band = g, band + 1
        if band % 2 == 0:
            out.append(f'<rect x="0" y="{y}" width="{width}" height="{bar_h}" fill="#f6f6f6"/>')
        if not math.isfinite(r.value):
            w, fill = plot_w, "#b00020"
        else:
            w, fill = (plot_w * r.value / top if top > 0 else 0.0), color[r.mtype]
        label = r.label if len(r.label) <= 48 else "…" + r.label[-47:]
        tip = f"{r.label}: rel error {format_number(r.value)}"
        out.append(
            f"<g><title>{escape(tip)}</title>"
            f'<text x="{label_w - 6}" y="{y + bar_h - 3}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.2f}" height="{bar_h - 4}" fill="{fill}"/>'
            f'<text x="{label_w + w + 4:.2f}" y="{y + bar_h - 3}">{escape(format_number(r.value))}</text></g>'
        )
    out.append(f'<line x1="{label_w}" y1="{top_pad}" x2="{label_w}" y2="{height - 6}" stroke="#888"/>')
    out.append("</svg>")
    legend = "".join(f'<span><i style="background:{color[t]}"></i>{escape(t)}</span>' for t in types)
    return f'<div class="legend">{legend}</div>\n' + "\n".join(out)


def _cell(x, num=False) -> str:
    if num:
        return f'<td class="num">{escape(format_number(x))}</td>'
    return f"<td>{escape('' if x is None else str(x))}</td>"


def _comparison_body(c: Comparison) -> str:
    counts: dict[str, int] = {}
    for t in c.tensors:
        counts[t.status] = counts.get(t.status, 0) + 1
    verdict = (
        '<p class="ok">Identical: every tensor bit-identical.</p>'
        if c.identical()
        else '<p class="bad">Not identical.</p>'
    )
    parts = [verdict, "<h2>Summary</h2><table><tr><th>status</th><th>tensors</th></tr>"]
    parts += [f"<tr>{_cell(k)}{_cell(v)}</tr>" for k, v in sorted(counts.items())]
    parts.append("</table>")
    if c.output is not None:
        o = c.output
        parts.append(
            "<h2>Outputs on the probe batch (A = candidate, B = reference)</h2><table>"
            f"<tr><th>logits max abs</th>{_cell(o.logits_max_abs, True)}</tr>"
            f"<tr><th>KL(p_B || p_A), mean per position</th>{_cell(o.kl_divergence, True)}</tr>"
            f'<tr><th>top-1 agreement</th><td class="num">{o.top1_agreement:.4f}</td></tr>'
            f"<tr><th>positions</th>{_cell(o.positions, True)}</tr></table>"
        )
    elif c.output_note:
        parts.append(f"<p>Outputs not compared: {escape(c.output_note)}</p>")
    parts.append("<h2>Relative error by layer and module type</h2>")
    parts.append(svg_chart(_rows_from(c)))
    parts.append(
        "<h2>Tensors</h2><table><tr><th>name</th><th>status</th><th>shape A</th><th>shape B</th>"
        "<th>dtype A</th><th>dtype B</th><th>max abs</th><th>rel error</th></tr>"
    )
    for t in c.tensors:
        cls = "" if t.status == "identical" else ' class="bad"'
        parts.append(
            f"<tr{cls}>{_cell(t.name)}{_cell(t.status)}{_cell(_shape(t.shape_a))}"
            f"{_cell(_shape(t.shape_b))}{_cell(t.dtype_a)}{_cell(t.dtype_b)}"
            f"{_cell(t.max_abs, True)}{_cell(t.rel_error, True)}</tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)


def _shape(s) -> str:
    return "" if s is None else "×".join(str(d) for d in s)


def _quality_body(rows: Sequence[LayerQuality]) -> str:
    finite = [r.rel_error for r in rows if math.isfinite(r.rel_error)]
    summary = (
        f"<p>{len(rows)} quantized modules; rel error mean {escape(format_number(sum(finite) / len(finite)))}, "
        f"max {escape(format_number(max(finite)))}.</p>"
        if finite
        else f"<p>{len(rows)} quantized modules.</p>"
    )
    parts = [summary, "<h2>Relative error by layer and module type</h2>", svg_chart(_rows_from(rows))]
    parts.append(
        "<h2>Modules</h2><table><tr><th>module</th><th>layer</th><th>type</th><th>quant</th>"
        "<th>shape</th><th>max abs</th><th>rel error</th></tr>"
    )
    for r in rows:
        parts.append(
            f"<tr>{_cell(r.name)}{_cell(r.layer)}{_cell(r.module_type)}{_cell(r.quant)}"
            f"{_cell(_shape(r.shape))}{_cell(r.max_abs, True)}{_cell(r.rel_error, True)}</tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)


def render_html(comparison_or_quality: Comparison | Sequence[LayerQuality], title: str) -> str:
    """The whole page as a string (UTF-8 declared inline)."""
    obj = comparison_or_quality
    if isinstance(obj, Comparison):
        body = _comparison_body(obj)
    elif isinstance(obj, Sequence) and all(isinstance(r, LayerQuality) for r in obj):
        body = _quality_body(obj)
    elif isinstance(obj, Sequence) and all(isinstance(r, TensorDiff) for r in obj):
        body = _comparison_body(Comparison(tensors=list(obj), output=None))
    else:
        raise TypeError(f"render_html expects a Comparison or a list of LayerQuality, got {type(obj).__name__}")
    t = escape(title)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{t}</title><style>{CSS}</style></head>\n<body><h1>{t}</h1>\n{body}\n</body></html>\n"
    )
