"""The library entry points the CLI is a thin layer over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qfinal.config import RunConfig, build_config, config_from_dict
from qfinal.pipeline.context import Context
from qfinal.pipeline.runner import run_pipeline
from qfinal.report import Report
from qfinal.checkpoint.sources import resolve_source


@dataclass
class Finalized:
    """A finalized model and the report of how it got there."""

    model: Any
    report: Report
    context: Context

    @property
    def ok(self) -> bool:
        return self.report.ok


def resolve_config(config: RunConfig | str | Path | None, overrides: dict) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return config_from_dict(config.model_dump(by_alias=True, exclude_unset=True), **overrides)
        return config
    return build_config(config, **overrides)


def load(source: str | Path, config: RunConfig | str | Path | None = None, *, allow_pickle: bool = False,
         on_stage: Callable[[str], None] | None = None, command: str = "load", **overrides: Any) -> Finalized:
    """Run the pipeline on `source` (a folder, a cached hub id, or "demo").

    `config` is a RunConfig or a YAML path; `overrides` use the CLI's option names
    (`quantize="nf4"`, `dtype="bfloat16"`, `adapters=[{"path": ..., "merge": True}]`).

    >>> result = load("demo", quantize="nf4")          # doctest: +SKIP
    >>> result.report.ok, type(result.model).__name__   # doctest: +SKIP
    (True, 'LlamaForCausalLM')
    """
    cfg = resolve_config(config, overrides)
    src = resolve_source(source)
    report = Report(source=src.label, command=command)
    ctx = Context(source=src, config=cfg, report=report, allow_pickle=allow_pickle)
    run_pipeline(ctx, on_stage=on_stage)
    return Finalized(model=ctx.model, report=report, context=ctx)
