from __future__ import annotations

from typing import Annotated

import typer

from qfinal.cli.options import (
    AdapterOpt,
    AllowPickleOpt,
    ConfigOpt,
    DequantizeOpt,
    DeviceMapOpt,
    DoubleQuantOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    MaxMemoryOpt,
    MergeOpt,
    OfflineOpt,
    OffloadOpt,
    QuantizeOpt,
    QuietOpt,
    RevisionOpt,
    ShardOpt,
    run_config,
)


def save(
    source: Annotated[str, typer.Argument(help="Model folder, a hub id (org/name[@revision]), or 'demo'.")],
    out: Annotated[str, typer.Argument(help="Output folder.")],
    config: ConfigOpt = None,
    quantize: QuantizeOpt = None,
    double_quant: DoubleQuantOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    adapter: AdapterOpt = None,
    merge: MergeOpt = False,
    dequantize: DequantizeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
    max_shard_size: ShardOpt = "2GB",
    force: ForceOpt = False,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Finalize SOURCE, save it to OUT, reload it twice and prove the round trip is exact."""
    from qfinal.sizes import parse_size

    parse_size(max_shard_size)  # refuse a bad size before torch is imported
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.save import save as run_save

    output = Output(json_path=json, quiet=quiet)
    cfg = run_config(config, locals())
    quiet_libraries()
    from qfinal.ops.save import SAVE_STEPS

    with output.stages(list(SAVE_STEPS)) as on_step:
        report = run_save(
            source, out, cfg, max_shard_size=max_shard_size, force=force, allow_pickle=allow_pickle, on_step=on_step
        )
    output.report(report)
    raise typer.Exit(0 if report.ok else 1)
