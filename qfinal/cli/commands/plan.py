from __future__ import annotations

from typing import Annotated

import typer

from qfinal.cli.options import (
    ConfigOpt,
    DeviceMapOpt,
    DoubleQuantOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    OfflineOpt,
    OffloadOpt,
    QuantizeOpt,
    QuietOpt,
    RevisionOpt,
    run_config,
)


def plan(
    source: Annotated[str, typer.Argument(help="Model folder, a hub id (org/name[@revision]), or 'demo'.")],
    config: ConfigOpt = None,
    quantize: QuantizeOpt = None,
    double_quant: DoubleQuantOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """What a load would do and cost, reading no tensor data (same as `load --dry-run`)."""
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.plan import plan as run_plan

    out = Output(json_path=json, quiet=quiet)
    cfg = run_config(config, locals())
    quiet_libraries()
    report = run_plan(source, cfg)
    out.report(report)
    raise typer.Exit(0 if report.ok else 1)
