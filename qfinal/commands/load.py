from __future__ import annotations

from typing import Annotated

import typer

from ..cli import (AdapterOpt, AllowPickleOpt, ConfigOpt, DequantizeOpt, DeviceMapOpt, DoubleQuantOpt, DtypeOpt,
                   JsonOpt, MaxMemoryOpt, MergeOpt, OffloadOpt, QuantizeOpt, QuietOpt, StopAfterOpt,
                   load_overrides)


def load(
    source: Annotated[str, typer.Argument(help="Model folder, a hub id in the local cache, or 'demo'.")],
    config: ConfigOpt = None, quantize: QuantizeOpt = None, double_quant: DoubleQuantOpt = None,
    dtype: DtypeOpt = None, device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None, adapter: AdapterOpt = None, merge: MergeOpt = False,
    dequantize: DequantizeOpt = False, allow_pickle: AllowPickleOpt = False, stop_after: StopAfterOpt = None,
    json: JsonOpt = None, quiet: QuietOpt = False,
) -> int:
    """Load SOURCE through the staged pipeline and report every stage, key and finding."""
    from ..api import load as run_load
    from ..config import build_config
    from ..output import Output, quiet_libraries
    from ..pipeline import STAGE_NAMES

    out = Output(json_path=json, quiet=quiet)
    cfg = build_config(config, **load_overrides(quantize, double_quant, dtype, device_map, max_memory,
                                                offload_folder, adapter, merge, dequantize, stop_after))
    quiet_libraries()
    with out.stages(list(STAGE_NAMES)) as on_stage:
        result = run_load(source, cfg, allow_pickle=allow_pickle, on_stage=on_stage)
    out.report(result.report)
    raise typer.Exit(0 if result.report.ok else 1)
