from __future__ import annotations

from typing import Annotated, Optional

import typer

from qfinal.cli.options import (
    AdapterOpt,
    AllowPickleOpt,
    ConfigOpt,
    JsonOpt,
    MergeOpt,
    OfflineOpt,
    QuietOpt,
    RevisionOpt,
    run_config,
)


def validate(
    source: Annotated[str, typer.Argument(help="Model folder, a hub id (org/name[@revision]), or 'demo'.")],
    config: ConfigOpt = None,
    fast: Annotated[bool, typer.Option("--fast", help="Headers and index only; never read tensor data.")] = False,
    json: JsonOpt = None,
    junit: Annotated[Optional[str], typer.Option("--junit", help="Write JUnit XML to FILE.")] = None,
    fail_on: Annotated[
        Optional[str],
        typer.Option(
            help="error|warning: the lowest severity that fails (default: validate.fail_on, else error).",
            show_default=False,
        ),
    ] = None,
    adapter: AdapterOpt = None,
    merge: MergeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Check SOURCE and exit 1 when a finding at or above --fail-on stands (a CI gate).

    Exit 0: nothing at or above the fail level; 1: something is; 2: SOURCE, the config or an
    option cannot be used. Checkpoint defects (missing shards, bad headers, index disagreements)
    are failed checks, exit 1.
    """
    from qfinal.checkpoint.sources import hub_request, resolve_source
    from qfinal.errors import ConfigError

    if fail_on is not None and fail_on not in ("error", "warning"):
        raise ConfigError(f"unknown level {fail_on!r}", where="--fail-on", hint="use error or warning")
    cfg = run_config(config, locals())
    level = fail_on or cfg.validate_.fail_on
    # a missing path fails before torch is imported; a hub id with --fast fetches only JSON and headers
    src = resolve_source(source, hub_request(cfg, allow_pickle=allow_pickle, headers_only=fast))

    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.validate import FAST_STAGES
    from qfinal.ops.validate import validate as run_validate

    out = Output(json_path=json, quiet=quiet)
    quiet_libraries()
    with out.stages([*FAST_STAGES, "validate"] if fast else list(_stage_names())) as on_stage:
        report = run_validate(src, cfg, fast=fast, allow_pickle=allow_pickle, on_stage=on_stage)
    report.extra["fail_on"] = level
    out.report(report, junit_path=junit, fail_on=level)
    raise typer.Exit(1 if report.failing(level) else 0)


def _stage_names() -> tuple[str, ...]:
    from qfinal.pipeline.runner import STAGE_NAMES

    return STAGE_NAMES
