"""The staged pipeline: check every stage statically, then run them in order into one report.

Each stage is a small object with a `name`, an optional `check(config)` that runs before any
weight is read, and `run(ctx)` that returns a status and a one-line detail. Stages never print;
the pipeline times them, records the process's peak RSS after each, and can stop after any.
"""

from __future__ import annotations

import time
from typing import Callable

from qfinal.errors import ConfigError
from qfinal.pipeline.context import Context, Stage, peak_rss_bytes
from qfinal.report import StageRecord

STAGE_NAMES = (
    "meta_init",
    "quantizer_preprocess",
    "checkpoint_dispatch",
    "postprocess",
    "tie_weights",
    "adapter_load",
    "runtime",
    "validate",
)


def default_stages() -> list[Stage]:
    from qfinal.pipeline.stages import STAGES

    return [cls() for cls in STAGES]


def run_pipeline(
    ctx: Context, stages: list[Stage] | None = None, on_stage: Callable[[str], None] | None = None
) -> Context:
    if ctx.prescan is None and (stages is None or any(s.name == "validate" for s in stages)):
        from qfinal.checkpoint.prescan import start_for

        try:
            ctx.prescan = start_for(ctx)  # first: it reads the files while the stages import torch
        except Exception:  # a helper that cannot start leaves the scan to validate
            ctx.prescan = None
    try:
        stages = stages if stages is not None else default_stages()
        names = [s.name for s in stages]
        stop_after = ctx.config.stop_after
        if stop_after is not None and stop_after not in names:
            raise ConfigError(f"unknown stage {stop_after!r}", where="stop_after", hint="one of: " + ", ".join(names))
        for stage in stages:
            stage.check(ctx.config)
        _run_stages(ctx, stages, stop_after, on_stage)
    finally:
        if ctx.prescan is not None:
            ctx.prescan.close()
            ctx.prescan = None
    return ctx


def _run_stages(
    ctx: Context, stages: list[Stage], stop_after: str | None, on_stage: Callable[[str], None] | None
) -> None:
    reached_end = False
    for stage in stages:
        if reached_end:
            ctx.report.stages.append(
                StageRecord(name=stage.name, status="not reached", detail=f"stopped after {stop_after}")
            )
            continue
        if on_stage:
            on_stage(stage.name)
        start = time.perf_counter()
        try:
            outcome = stage.run(ctx)
        except BaseException:
            ctx.report.stages.append(
                StageRecord(
                    name=stage.name,
                    status="failed",
                    seconds=time.perf_counter() - start,
                    peak_rss_bytes=peak_rss_bytes(),
                )
            )
            raise
        ctx.report.stages.append(
            StageRecord(
                name=stage.name,
                status=outcome.status,
                seconds=round(time.perf_counter() - start, 6),
                peak_rss_bytes=peak_rss_bytes(),
                detail=outcome.detail,
            )
        )
        if stage.name == stop_after:
            reached_end = True
