"""`load --quality`: the per-layer quantization error as a terminal bar chart or an HTML page."""

from __future__ import annotations

from pathlib import Path

from qfinal.compare.layers import LayerQuality
from qfinal.ops.quality import summary


def write_quality_html(rows: list[LayerQuality], path: str | Path, title: str) -> None:
    from qfinal.checkpoint.atomic import write_text_atomic
    from qfinal.render.html import render_html

    write_text_atomic(Path(path).expanduser(), render_html(rows, title))


def render_quality(rows: list[LayerQuality], console) -> None:
    """The per-layer bar chart (nothing when there are no rows)."""
    if rows:
        from qfinal.render.bars import render_rich_bars

        width = max(10, min(40, console.width - 70))
        render_rich_bars(
            rows, console, title="Quantization error by layer: ||dequant - original|| / ||original||", width=width
        )
        console.print(summary(rows), highlight=False)
