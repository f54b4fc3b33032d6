"""The library entry points the CLI is a thin layer over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qfinal.checkpoint.sources import hub_adapters, hub_request, resolve_source, stamp_report
from qfinal.config import RunConfig, resolve_config
from qfinal.pipeline.context import Context
from qfinal.pipeline.runner import run_pipeline
from qfinal.report import Report


@dataclass
class Finalized:
    """A finalized model and the report of how it got there."""

    model: Any
    report: Report
    context: Context

    @property
    def ok(self) -> bool:
        return self.report.ok


def load(
    source: str | Path,
    config: RunConfig | str | Path | None = None,
    *,
    allow_pickle: bool = False,
    on_stage: Callable[[str], None] | None = None,
    command: str = "load",
    on_progress: Callable[[int, int, str], None] | None = None,
    tokenizer: bool = False,
    **overrides: Any,
) -> Finalized:
    """Run the pipeline on `source` (a folder, a hub id, or "demo").

    `config` is a RunConfig or a YAML path; `overrides` use the CLI's option names
    (`quantize="nf4"`, `dtype="bfloat16"`, `adapters=[{"path": ..., "merge": True}]`).
    `on_stage(name)` is called as each stage starts, `on_progress(done, total, what)` inside the
    long ones. A hub id is downloaded unless cached or offline (`revision=`, `offline=` in the
    config); `tokenizer=True` fetches its tokenizer files too (for a save).

    >>> result = load("demo", quantize="nf4")          # doctest: +SKIP
    >>> result.report.ok, type(result.model).__name__   # doctest: +SKIP
    (True, 'LlamaForCausalLM')
    """
    cfg = resolve_config(config, overrides)
    src = resolve_source(source, hub_request(cfg, allow_pickle=allow_pickle, tokenizer=tokenizer))
    cfg = hub_adapters(cfg, allow_pickle=allow_pickle)
    report = Report(source=src.label, command=command)
    stamp_report(report, src)
    ctx = Context(source=src, config=cfg, report=report, allow_pickle=allow_pickle, on_progress=on_progress)
    run_pipeline(ctx, on_stage=on_stage)
    return Finalized(model=ctx.model, report=report, context=ctx)
