"""Relative error per layer or tensor as a rich bar chart (`load --quality`, `diff`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qfinal.compare.layers import LayerQuality, module_type_of, parse_layer
from qfinal.compare.tensors import format_number

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

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
        table.add_row(
            Text(r.name),
            "" if layer is None else str(layer),
            Text(mtype),
            format_number(r.rel_error),
            Text(bar(r.rel_error, top, width), style="magenta"),
        )
    return table


__all__ = ["bar", "rich_bars_table", "render_rich_bars"]
