"""The human view of a Report. The only module that imports rich's table machinery."""

from __future__ import annotations

from collections import Counter

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qfinal.report import Report

MAX_ROWS = 25
STATUS_STYLE = {"ran": "green", "nothing to do": "dim", "skipped by request": "yellow",
                "not reached": "dim", "failed": "red"}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def _mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.0f} MiB"


def _k(key: str | None) -> str:
    return escape(ascii(key)[1:-1]) if key else "-"


def _capped(table: Table, rows: list, ncols: int) -> Table:
    for row in rows[:MAX_ROWS]:
        table.add_row(*row)
    if len(rows) > MAX_ROWS:
        table.add_row(f"… {len(rows) - MAX_ROWS} more (see --json)", *[""] * (ncols - 1))
    return table


def render(report: Report, console: Console) -> None:
    console.print(build(report))


def build(report: Report) -> Group:
    parts = []
    head = Text.assemble(("qfinal ", "bold"), (report.command, "bold cyan"), "  ", report.source,
                         "  →  ", (report.model_class or "?", "bold"),
                         f"  dtype={report.dtype or '?'}  quantization={report.quantization}")
    if report.trust_remote_code:
        head.append("  trust_remote_code=ON", style="bold yellow")
    parts.append(head)

    stages = Table(title="Stages", title_justify="left", expand=False)
    for col in ("stage", "status", "seconds", "peak RSS"):
        stages.add_column(col, justify="right" if col in ("seconds", "peak RSS") else "left", no_wrap=True)
    stages.add_column("detail", ratio=1)
    for s in report.stages:
        stages.add_row(s.name, Text(s.status, style=STATUS_STYLE.get(s.status, "")), f"{s.seconds:.3f}",
                       _mib(s.peak_rss_bytes), escape(s.detail))
    parts.append(stages)

    keys = report.keys
    if keys.tied:
        t = Table(title="Tied keys", title_justify="left")
        for col in ("target", "source", "shares storage"):
            t.add_column(col)
        parts.append(_capped(t, [(_k(x.target), _k(x.source), Text("yes", "green") if x.shared else
                                  Text("NO", "bold red")) for x in keys.tied], 3))
    if keys.missing or keys.unexpected or keys.mismatched:
        t = Table(title="Key problems", title_justify="left")
        for col in ("kind", "key", "detail"):
            t.add_column(col)
        rows = [("missing", _k(k), "") for k in keys.missing]
        rows += [("unexpected", _k(k), "") for k in keys.unexpected]
        rows += [("mismatched", _k(m.key), f"checkpoint {m.checkpoint_shape} vs model {m.model_shape}")
                 for m in keys.mismatched]
        parts.append(_capped(t, rows, 3))
    if keys.converted:
        counts = Counter(f"{c.from_} → {c.to}" for c in keys.converted)
        t = Table(title=f"Converted modules ({len(keys.converted)})", title_justify="left")
        t.add_column("from → to")
        t.add_column("count", justify="right")
        t.add_column("modules")
        for kind, n in sorted(counts.items()):
            names = [c.module for c in keys.converted if f"{c.from_} → {c.to}" == kind]
            shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
            t.add_row(kind, str(n), escape(shown))
        parts.append(t)
    if keys.skipped:
        t = Table(title="Skipped modules", title_justify="left")
        t.add_column("module")
        t.add_column("reason")
        parts.append(_capped(t, [(_k(s.module), escape(s.reason)) for s in keys.skipped], 2))
    if report.adapters:
        t = Table(title="Adapters", title_justify="left")
        for col in ("name", "path", "matched", "unused", "unmatched targets", "merged"):
            t.add_column(col)
        for a in report.adapters:
            t.add_row(escape(a.name), escape(a.path), str(a.matched), str(len(a.unused)),
                      escape(", ".join(a.unmatched_targets) or "-"), "yes" if a.merged else "no")
        parts.append(t)
    plan = report.extra.get("plan")
    if plan:
        t = Table(title="Plan: bytes per device (no tensor data read)", title_justify="left")
        t.add_column("device")
        t.add_column("bytes", justify="right")
        for device, nbytes in plan["bytes_per_device"].items():
            t.add_row(device, _mib(nbytes))
        parts.append(t)
        if plan["large_unquantized"]:
            parts.append(Text("Large unquantized leaves: " + ", ".join(
                f"{leaf['module']} ({_mib(leaf['bytes'])}, {leaf['share']:.0%})" for leaf in plan["large_unquantized"])))
        layers = Table(title="Plan: placement by module", title_justify="left")
        layers.add_column("module")
        layers.add_column("device")
        parts.append(_capped(layers, [(_k(r["module"]), r["device"]) for r in plan["layers"]], 2))
    elif report.placement and len(set(report.placement.values())) > 1:
        counts = Counter(report.placement.values())
        parts.append(Text("Placement: " + ", ".join(f"{n} module(s) on {d}" for d, n in sorted(counts.items()))))

    shown = [f for f in report.findings if f.severity != "info"]
    infos = len(report.findings) - len(shown)
    if shown:
        t = Table(title="Findings", title_justify="left")
        for col in ("severity", "check", "key", "message"):
            t.add_column(col)
        parts.append(_capped(t, [(Text(f.severity, SEVERITY_STYLE[f.severity]), f.check, _k(f.key),
                                  escape(f.message)) for f in shown], 4))
    verdict = Text("OK", "bold green") if report.ok else Text("FAILED", "bold red")
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    parts.append(Text.assemble(verdict, f"  {errors} error(s), {warnings} warning(s), {infos} info"))
    return Group(*parts)
