"""The staged pipeline: check every stage statically, then run them in order into one report.

Each stage is a small object with a `name`, an optional `check(config)` that runs before any
weight is read, and `run(ctx)` that returns a status and a one-line detail. Stages never print;
the pipeline times them, records the process's peak RSS after each, and can stop after any.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .config import RunConfig
from .errors import ConfigError
from .report import Report, StageRecord
from .sources import Source

STAGE_NAMES = ("meta_init", "quantizer_preprocess", "checkpoint_dispatch", "postprocess",
               "tie_weights", "adapter_load", "runtime", "validate")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Outcome:
    status: str = "ran"
    detail: str = ""


@dataclass
class Context:
    """What stages hand to each other. Filled in as the pipeline goes."""

    source: Source
    config: RunConfig
    report: Report
    allow_pickle: bool = False
    hf_config: Any = None
    model_class: Any = None
    inventory: Any = None
    dtype: Any = None
    hf_quantizer: Any = None
    device_map: Any = None
    load_config: Any = None
    model: Any = None
    loading_info: Any = None
    disk_offload_index: Any = None
    original_classes: dict[str, str] = field(default_factory=dict)
    dequantized: bool = False  # postprocess (or a merge) turned the bnb modules back into plain ones
    prescan: Any = None  # prescan.Prescan: the NaN scan of the files, running while torch imports
    scratch: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def check(self, config: RunConfig) -> None: ...

    def run(self, ctx: Context) -> Outcome: ...


def default_stages() -> list[Stage]:
    from .stages import STAGES

    return [cls() for cls in STAGES]


def run_pipeline(ctx: Context, stages: list[Stage] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> Context:
    if ctx.prescan is None and (stages is None or any(s.name == "validate" for s in stages)):
        from .prescan import start_for

        try:
            ctx.prescan = start_for(ctx)  # first: it reads the files while the stages import torch
        except Exception:  # a helper that cannot start leaves the scan to validate
            ctx.prescan = None
    try:
        stages = stages if stages is not None else default_stages()
        names = [s.name for s in stages]
        stop_after = ctx.config.stop_after
        if stop_after is not None and stop_after not in names:
            raise ConfigError(f"unknown stage {stop_after!r}", where="stop_after",
                              hint="one of: " + ", ".join(names))
        for stage in stages:
            stage.check(ctx.config)
        _run_stages(ctx, stages, stop_after, on_stage)
    finally:
        if ctx.prescan is not None:
            ctx.prescan.close()
            ctx.prescan = None
    return ctx


def _run_stages(ctx: Context, stages: list[Stage], stop_after: str | None,
                on_stage: Callable[[str], None] | None) -> None:
    reached_end = False
    for stage in stages:
        if reached_end:
            ctx.report.stages.append(StageRecord(name=stage.name, status="not reached",
                                                 detail=f"stopped after {stop_after}"))
            continue
        if on_stage:
            on_stage(stage.name)
        start = time.perf_counter()
        try:
            outcome = stage.run(ctx)
        except BaseException:
            ctx.report.stages.append(StageRecord(name=stage.name, status="failed",
                                                 seconds=time.perf_counter() - start,
                                                 peak_rss_bytes=peak_rss_bytes()))
            raise
        ctx.report.stages.append(StageRecord(name=stage.name, status=outcome.status,
                                             seconds=round(time.perf_counter() - start, 6),
                                             peak_rss_bytes=peak_rss_bytes(), detail=outcome.detail))
        if stage.name == stop_after:
            reached_end = True
