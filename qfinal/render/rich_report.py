"""The human view of a Report. The only module that imports rich's table machinery."""

from __future__ import annotations

from collections import Counter

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qfinal.report import Report

MAX_ROWS = 25
# Each column of a rich table costs its text plus 3 cells (padding and a border).
CELL = 3


def _fits(widths: list[int], longest: int, width: int) -> bool:
    """Whether a last column of `longest` characters fits beside columns of `widths` unwrapped: when
    it does not (a CI log is often 80 columns), the detail goes under its row at the full width
    instead of being squeezed to a word or two a line between borders."""
    return sum(w + CELL for w in widths) + longest + CELL + 1 <= width


STATUS_STYLE = {
    "ran": "green",
    "nothing to do": "dim",
    "skipped by request": "yellow",
    "not reached": "dim",
    "failed": "red",
}
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
    console.print(build(report, console.width))


def _details(title: str, rows: list[tuple[Text, str]]) -> Group:
    """Narrow terminals: one line per row, its detail wrapped beneath it at the full width."""
    lines: list = [Text(title, style="italic")]
    for head, detail in rows[:MAX_ROWS]:
        lines.append(head)
        if detail:
            lines.append(Text("    ") + Text(detail, style="dim"))
    if len(rows) > MAX_ROWS:
        lines.append(Text(f"… {len(rows) - MAX_ROWS} more (see --json)"))
    return Group(*lines)


def build(report: Report, width: int = 200) -> Group:
    parts = []
    head = Text.assemble(
        ("qfinal ", "bold"),
        (report.command, "bold cyan"),
        "  ",
        report.source,
        "  →  ",
        (report.model_class or "?", "bold"),
        f"  dtype={report.dtype or '?'}  quantization={report.quantization}",
    )
    if report.trust_remote_code:
        head.append("  trust_remote_code=ON", style="bold yellow")
    parts.append(head)

    stage_columns = [
        max([5, *(len(s.name) for s in report.stages)]),
        max([6, *(len(s.status) for s in report.stages)]),
        9,
        10,
    ]
    narrow = not _fits(stage_columns, max([0, *(len(s.detail) for s in report.stages)]), width)
    stages = Table(title="Stages", title_justify="left", expand=False)
    for col in ("stage", "status", "seconds", "peak RSS"):
        stages.add_column(col, justify="right" if col in ("seconds", "peak RSS") else "left", no_wrap=True)
    if not narrow:
        stages.add_column("detail", ratio=1)
    for s in report.stages:
        row = [s.name, Text(s.status, style=STATUS_STYLE.get(s.status, "")), f"{s.seconds:.3f}", _mib(s.peak_rss_bytes)]
        stages.add_row(*row, *([] if narrow else [escape(s.detail)]))
    parts.append(stages)
    if narrow:
        parts.append(
            _details("Stage details", [(Text(s.name, style="bold"), s.detail) for s in report.stages if s.detail])
        )

    keys = report.keys
    if keys.tied:
        t = Table(title="Tied keys", title_justify="left")
        for col in ("target", "source", "shares storage"):
            t.add_column(col)
        parts.append(
            _capped(
                t,
                [
                    (_k(x.target), _k(x.source), Text("yes", "green") if x.shared else Text("NO", "bold red"))
                    for x in keys.tied
                ],
                3,
            )
        )
    if keys.missing or keys.unexpected or keys.mismatched:
        t = Table(title="Key problems", title_justify="left")
        for col in ("kind", "key", "detail"):
            t.add_column(col)
        rows = [("missing", _k(k), "") for k in keys.missing]
        rows += [("unexpected", _k(k), "") for k in keys.unexpected]
        rows += [
            ("mismatched", _k(m.key), f"checkpoint {m.checkpoint_shape} vs model {m.model_shape}")
            for m in keys.mismatched
        ]
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
        for col in ("name", "path", "type", "adds", "matched", "unused", "unmatched targets", "merged"):
            t.add_column(col)
        for a in report.adapters:
            kind = (a.peft_type or "?") + (f" ({', '.join(a.variants)})" if a.variants else "")
            adds = ", ".join(
                x
                for x in (
                    f"{len(a.wrapped_modules)} module(s)" if a.wrapped_modules else "",
                    f"{a.virtual_tokens} virtual token(s)" if a.virtual_tokens else "",
                )
                if x
            )
            t.add_row(
                escape(a.name),
                escape(a.path),
                escape(kind),
                adds or "-",
                str(a.matched),
                str(len(a.unused)),
                escape(", ".join(a.unmatched_targets) or "-"),
                "yes" if a.merged else "no",
            )
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
            parts.append(
                Text(
                    "Large unquantized leaves: "
                    + ", ".join(
                        f"{leaf['module']} ({_mib(leaf['bytes'])}, {leaf['share']:.0%})"
                        for leaf in plan["large_unquantized"]
                    )
                )
            )
        layers = Table(title="Plan: placement by module", title_justify="left")
        layers.add_column("module")
        layers.add_column("device")
        parts.append(_capped(layers, [(_k(r["module"]), r["device"]) for r in plan["layers"]], 2))
    elif report.placement and len(set(report.placement.values())) > 1:
        counts = Counter(report.placement.values())
        parts.append(Text("Placement: " + ", ".join(f"{n} module(s) on {d}" for d, n in sorted(counts.items()))))

    shown = [f for f in report.findings if f.severity != "info"]
    infos = len(report.findings) - len(shown)
    finding_columns = [8, max([5, *(len(f.check) for f in shown)]), max([3, *(len(_k(f.key)) for f in shown)])]
    if shown and not _fits(finding_columns, max(len(f.message) for f in shown), width):
        parts.append(
            _details(
                "Findings",
                [
                    (
                        Text.assemble(
                            (f.severity, SEVERITY_STYLE[f.severity]), "  ", f.check, "  ", Text.from_markup(_k(f.key))
                        ),
                        f.message,
                    )
                    for f in shown
                ],
            )
        )
    elif shown:
        t = Table(title="Findings", title_justify="left")
        for col in ("severity", "check", "key", "message"):
            t.add_column(col)
        parts.append(
            _capped(
                t,
                [(Text(f.severity, SEVERITY_STYLE[f.severity]), f.check, _k(f.key), escape(f.message)) for f in shown],
                4,
            )
        )
    verdict = Text("OK", "bold green") if report.ok else Text("FAILED", "bold red")
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    parts.append(Text.assemble(verdict, f"  {errors} error(s), {warnings} warning(s), {infos} info"))
    return Group(*parts)
