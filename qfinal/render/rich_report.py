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


def key_cell(key: str | None) -> str:
    """A tensor or module name as one escaped, printable cell."""
    return escape(ascii(key)[1:-1]) if key else "-"


def capped(table: Table, rows: list, ncols: int) -> Table:
    """`table` with the first MAX_ROWS rows and a last row that counts the rest."""
    for row in rows[:MAX_ROWS]:
        table.add_row(*row)
    if len(rows) > MAX_ROWS:
        table.add_row(f"… {len(rows) - MAX_ROWS} more (see --json)", *[""] * (ncols - 1))
    return table


def titled_table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
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
    """The whole report, one section after another; empty sections are left out."""
    return Group(
        _head(report),
        *_stages(report, width),
        *_tied_keys(report),
        *_key_problems(report),
        *_converted_modules(report),
        *_skipped_modules(report),
        *_adapters(report),
        *_plan_or_placement(report),
        *_findings(report, width),
        _summary(report),
    )


def _head(report: Report) -> Text:
    head = Text.assemble(
        ("qfinal ", "bold"),
        (report.command, "bold cyan"),
        "  ",
        report.source + (f"@{report.commit[:12]}" if report.commit else ""),
        "  →  ",
        (report.model_class or "?", "bold"),
        f"  dtype={report.dtype or '?'}  quantization={report.quantization}",
    )
    if report.trust_remote_code:
        head.append("  trust_remote_code=ON", style="bold yellow")
    return head


def _stages(report: Report, width: int) -> list:
    """The stage table; on a narrow terminal its details go beneath it instead of in a column."""
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
    if not narrow:
        return [stages]
    return [
        stages,
        _details("Stage details", [(Text(s.name, style="bold"), s.detail) for s in report.stages if s.detail]),
    ]


def _tied_keys(report: Report) -> list:
    tied = report.keys.tied
    if not tied:
        return []
    rows = [
        (key_cell(x.target), key_cell(x.source), Text("yes", "green") if x.shared else Text("NO", "bold red"))
        for x in tied
    ]
    return [capped(titled_table("Tied keys", ("target", "source", "shares storage")), rows, 3)]


def _key_problems(report: Report) -> list:
    keys = report.keys
    if not (keys.missing or keys.unexpected or keys.mismatched):
        return []
    rows = [("missing", key_cell(k), "") for k in keys.missing]
    rows += [("unexpected", key_cell(k), "") for k in keys.unexpected]
    rows += [
        ("mismatched", key_cell(m.key), f"checkpoint {m.checkpoint_shape} vs model {m.model_shape}")
        for m in keys.mismatched
    ]
    return [capped(titled_table("Key problems", ("kind", "key", "detail")), rows, 3)]


def _converted_modules(report: Report) -> list:
    """One row per kind of conversion, with its count and the first few module names."""
    converted = report.keys.converted
    if not converted:
        return []
    counts = Counter(f"{c.from_} → {c.to}" for c in converted)
    t = Table(title=f"Converted modules ({len(converted)})", title_justify="left")
    t.add_column("from → to")
    t.add_column("count", justify="right")
    t.add_column("modules")
    for kind, n in sorted(counts.items()):
        names = [c.module for c in converted if f"{c.from_} → {c.to}" == kind]
        shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
        t.add_row(kind, str(n), escape(shown))
    return [t]


def _skipped_modules(report: Report) -> list:
    skipped = report.keys.skipped
    if not skipped:
        return []
    rows = [(key_cell(s.module), escape(s.reason)) for s in skipped]
    return [capped(titled_table("Skipped modules", ("module", "reason")), rows, 2)]


def _adapters(report: Report) -> list:
    if not report.adapters:
        return []
    t = titled_table("Adapters", ("name", "path", "type", "adds", "matched", "unused", "unmatched targets", "merged"))
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
    return [t]


def _plan_or_placement(report: Report) -> list:
    """`qfinal plan`'s bytes per device and placement; otherwise a one-line placement summary when
    the model is spread over several devices."""
    plan = report.extra.get("plan")
    if plan:
        return _plan(plan)
    if report.placement and len(set(report.placement.values())) > 1:
        counts = Counter(report.placement.values())
        return [Text("Placement: " + ", ".join(f"{n} module(s) on {d}" for d, n in sorted(counts.items())))]
    return []


def _plan(plan: dict) -> list:
    parts: list = []
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
    layers = titled_table("Plan: placement by module", ("module", "device"))
    parts.append(capped(layers, [(key_cell(r["module"]), r["device"]) for r in plan["layers"]], 2))
    return parts


def _findings(report: Report, width: int) -> list:
    """Errors and warnings (infos are only counted): a table, or one line each with the message
    beneath when the messages would not fit a column."""
    shown = [f for f in report.findings if f.severity != "info"]
    if not shown:
        return []
    finding_columns = [8, max([5, *(len(f.check) for f in shown)]), max([3, *(len(key_cell(f.key)) for f in shown)])]
    if not _fits(finding_columns, max(len(f.message) for f in shown), width):
        rows = [
            (
                Text.assemble(
                    (f.severity, SEVERITY_STYLE[f.severity]), "  ", f.check, "  ", Text.from_markup(key_cell(f.key))
                ),
                f.message,
            )
            for f in shown
        ]
        return [_details("Findings", rows)]
    rows = [(Text(f.severity, SEVERITY_STYLE[f.severity]), f.check, key_cell(f.key), escape(f.message)) for f in shown]
    return [capped(titled_table("Findings", ("severity", "check", "key", "message")), rows, 4)]


def _summary(report: Report) -> Text:
    verdict = Text("OK", "bold green") if report.ok else Text("FAILED", "bold red")
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    infos = sum(f.severity == "info" for f in report.findings)
    return Text.assemble(verdict, f"  {errors} error(s), {warnings} warning(s), {infos} info")
