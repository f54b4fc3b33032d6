"""The human view of `qfinal diff`: the worst tensors, the output metrics, and the verdict."""

from __future__ import annotations

import math

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qfinal.compare.tensors import Comparison, TensorDiff, Tolerances, format_number, tensor_fails
from qfinal.render.rich_report import SEVERITY_STYLE, capped, key_cell, titled_table
from qfinal.report import Report

STATUS_STYLE = {
    "identical": "green",
    "different": "yellow",
    "dtype": "yellow",
    "shape": "bold red",
    "only_a": "bold red",
    "only_b": "bold red",
}


def _shape(s) -> str:
    return "-" if s is None else "×".join(str(d) for d in s)


def _pair(a: str, b: str) -> str:
    return a if a == b else f"{a} vs {b}"


def worst_tensors(comparison: Comparison, tolerances: Tolerances, top: int) -> list[TensorDiff]:
    """Failing tensors first (missing, shape, then by relative error), then the other non-identical
    ones by relative error; bit-identical tensors are never listed."""
    failing = comparison.exceeds(tolerances)
    seen = {t.name for t in failing}
    rest = [t for t in comparison.tensors if t.name not in seen and not t.bit_identical]
    rest.sort(key=lambda t: (t.rel_error if t.rel_error is not None else 0.0, t.max_abs or 0.0), reverse=True)
    return (failing + rest)[:top]


def _verdict(report: Report, comparison: Comparison) -> Text:
    if not report.ok:
        return (
            Text("DIFFERENT", "bold red")
            if any(f.severity == "error" and f.check.startswith("diff_") for f in report.findings)
            else Text("FAILED", "bold red")
        )
    if comparison.identical():
        return Text("IDENTICAL", "bold green")
    return Text("WITHIN TOLERANCES", "bold green")


CHART_ROWS = 60


def error_chart(comparison: Comparison, rows: int = CHART_ROWS):
    """The relative error of every differing tensor, in checkpoint (so layer) order, as bars: where
    along the depth of the model the difference sits. Long lists keep the largest errors."""
    from qfinal.render.bars import rich_bars_table

    differing = [t for t in comparison.tensors if not t.bit_identical and t.rel_error is not None]
    shown = differing
    if len(differing) > rows:
        largest = sorted(differing, key=lambda t: 0.0 if math.isnan(t.rel_error) else t.rel_error, reverse=True)
        keep = {id(t) for t in largest[:rows]}
        shown = [t for t in differing if id(t) in keep]
    title = (
        "Relative error by layer ("
        + (
            f"the {rows} largest of {len(differing)}"
            if len(shown) < len(differing)
            else f"{len(differing)} differing tensor(s)"
        )
        + ")"
    )
    return rich_bars_table(shown, title=title, width=20)


def build(report: Report, comparison: Comparison, tolerances: Tolerances, *, top: int = 15) -> Group:
    """Header, tensor counts, the worst tensors (or "all identical"), outputs, findings, verdict."""
    return Group(
        _head(report),
        Text("A is the candidate, B the reference: rel error = ||A−B|| / ||B||, KL = KL(p_B ‖ p_A).", style="dim"),
        _status_counts(comparison),
        *_worst(comparison, tolerances, top),
        *_outputs(comparison, tolerances),
        *_findings(report),
        _summary(report, comparison, tolerances),
    )


def _head(report: Report) -> Text:
    data = report.extra.get("diff", {})
    return Text.assemble(
        ("qfinal ", "bold"),
        ("diff", "bold cyan"),
        "  ",
        ("A ", "bold"),
        data.get("a", {}).get("argument", "?"),
        "  vs  ",
        ("B ", "bold"),
        data.get("b", {}).get("argument", "?"),
        f"  ({report.model_class or '?'}; quantization {report.quantization}; "
        f"dtype {report.dtype or '?'}; {data.get('mode', 'dequantized')} values)",
    )


def _status_counts(comparison: Comparison) -> Text:
    counts: dict[str, int] = {}
    for t in comparison.tensors:
        counts[t.status] = counts.get(t.status, 0) + 1
    return Text(
        f"{len(comparison.tensors)} tensors: "
        + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    )


def _worst(comparison: Comparison, tolerances: Tolerances, top: int) -> list:
    """The worst tensors' table and the error chart, or one line when every tensor is bit-identical."""
    rows = worst_tensors(comparison, tolerances, top)
    if not rows:
        return [Text(f"All {len(comparison.tensors)} tensors are bit-identical.", "green")]
    n_diff = sum(1 for t in comparison.tensors if not t.bit_identical)
    title = f"Worst tensors ({len(rows)} of {n_diff} not bit-identical)"
    table = Table(title=title, title_justify="left")
    table.add_column("tensor", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("shape", overflow="fold")
    table.add_column("dtype", overflow="fold")
    for col in ("max abs", "rel error"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for t in rows:
        ok = not tensor_fails(t, tolerances)
        table.add_row(
            Text(t.name),
            Text(t.status.replace("_", " "), STATUS_STYLE.get(t.status, "")),
            _pair(
                _shape(t.shape_a) + (" (T)" if t.aligned == "a" else ""),
                _shape(t.shape_b) + (" (T)" if t.aligned == "b" else ""),
            ),
            _pair(t.dtype_a or "-", t.dtype_b or "-"),
            format_number(t.max_abs),
            format_number(t.rel_error),
            Text("ok", "green") if ok else Text("FAIL", "bold red"),
        )
    return [table, error_chart(comparison)]


def _outputs(comparison: Comparison, tolerances: Tolerances) -> list:
    """The output metrics against their tolerances, or why outputs were not compared."""
    o = comparison.output
    if o is None:
        return [Text(f"Outputs not compared: {comparison.output_note}", "yellow")] if comparison.output_note else []
    table = Table(title=f"Outputs on the probe batch ({o.positions} positions)", title_justify="left")
    for col in ("metric", "value", "tolerance", ""):
        table.add_column(col, justify="right" if col in ("value", "tolerance") else "left")
    max_kl = tolerances.max_kl
    for name, value, tol_text, ok in (
        (
            "logits max abs",
            format_number(o.logits_max_abs),
            f"<= {format_number(tolerances.logits_max_abs)}",
            o.logits_max_abs <= tolerances.logits_max_abs,
        ),
        (
            "KL(p_B ‖ p_A) mean",
            format_number(o.kl_divergence),
            "not judged" if max_kl is None else f"<= {format_number(max_kl)}",
            max_kl is None or o.kl_divergence <= max_kl,
        ),
        (
            "top-1 agreement",
            f"{o.top1_agreement:.4f}",
            f">= {tolerances.min_top1:g}",
            o.top1_agreement >= tolerances.min_top1,
        ),
    ):
        table.add_row(name, value, tol_text, Text("ok", "green") if ok else Text("BEYOND", "bold red"))
    return [table]


def _findings(report: Report) -> list:
    """Findings that the tables above do not already show: the sides' own load findings, key lists."""
    shown = [
        f
        for f in report.findings
        if f.severity != "info"
        and f.check not in ("diff_tensors", "diff_logits")
        and not (f.check == "diff_keys" and f.key is not None)
    ]
    if not shown:
        return []
    rows = [(Text(f.severity, SEVERITY_STYLE[f.severity]), f.check, key_cell(f.key), escape(f.message)) for f in shown]
    return [capped(titled_table("Findings", ("severity", "check", "key", "message")), rows, 4)]


def _tolerance_text(tolerances: Tolerances) -> str:
    if tolerances == Tolerances():
        return "exact equality"
    return (
        f"max abs {format_number(tolerances.max_abs)}, rel error {format_number(tolerances.rel_error)}, "
        f"logits max abs {format_number(tolerances.logits_max_abs)}, top-1 >= {tolerances.min_top1:g}"
        + ("" if tolerances.max_kl is None else f", KL <= {format_number(tolerances.max_kl)}")
        + (", dtype changes allowed" if tolerances.allow_dtype_change else "")
    )


def _summary(report: Report, comparison: Comparison, tolerances: Tolerances) -> Text:
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    return Text.assemble(
        _verdict(report, comparison),
        f"  tolerances: {_tolerance_text(tolerances)}; {errors} error(s), {warnings} warning(s)",
    )


def render(report: Report, comparison: Comparison, tolerances: Tolerances, console: Console, *, top: int = 15) -> None:
    console.print(build(report, comparison, tolerances, top=top))


__all__ = ["render", "build", "worst_tensors"]
