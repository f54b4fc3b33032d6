from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli import AllowPickleOpt, ConfigOpt, JsonOpt, QuietOpt


def validate(
    source: Annotated[str, typer.Argument(help="Model folder, a hub id in the local cache, or 'demo'.")],
    config: ConfigOpt = None,
    fast: Annotated[bool, typer.Option("--fast", help="Headers and index only; never read tensor data.")] = False,
    json: JsonOpt = None,
    junit: Annotated[Optional[str], typer.Option("--junit", help="Write JUnit XML to FILE.")] = None,
    fail_on: Annotated[str, typer.Option(help="error|warning: the lowest severity that fails.")] = "error",
    allow_pickle: AllowPickleOpt = False, quiet: QuietOpt = False,
) -> int:
    """Check SOURCE and exit 1 when a finding at or above --fail-on stands (a CI gate)."""
    from ..config import build_config
    from ..errors import ConfigError
    from ..output import Output, quiet_libraries
    from ..pipeline import STAGE_NAMES
    from ..validation import validate as run_validate

    if fail_on not in ("error", "warning"):
        raise ConfigError(f"unknown level {fail_on!r}", where="--fail-on", hint="use error or warning")
    out = Output(json_path=json, quiet=quiet)
    cfg = build_config(config)
    quiet_libraries()
    with out.stages(list(STAGE_NAMES[:2]) if fast else list(STAGE_NAMES)) as on_stage:
        report = run_validate(source, cfg, fast=fast, allow_pickle=allow_pickle, on_stage=on_stage)
    out.report(report, junit_path=junit, fail_on=fail_on)
    raise typer.Exit(1 if report.failing(fail_on) else 0)
