from __future__ import annotations

from typing import Annotated

import typer

from qfinal.cli.options import AddressOpt, ExecutorOpt, ForceOpt, JsonOpt, QuietOpt, ShardOpt, WorkersOpt


def dequantize(
    source: Annotated[str, typer.Argument(help="A bitsandbytes nf4/fp4/int8 checkpoint folder (or hub id).")],
    out: Annotated[str, typer.Argument(help="Output folder for the plain checkpoint.")],
    dtype: Annotated[str, typer.Option(help="float16|bfloat16|float32.")] = "float16",
    max_shard_size: ShardOpt = "2GB",
    verify: Annotated[bool, typer.Option("--verify", help="Reload OUT with plain transformers and compare.")] = False,
    force: ForceOpt = False,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Stream a bnb checkpoint back to plain fp16/bf16/fp32 safetensors, shard by shard."""
    from qfinal.checkpoint.dtypes import check_output_dtype
    from qfinal.ops.executors import make_executor
    from qfinal.sizes import parse_size

    check_output_dtype(dtype)
    parse_size(max_shard_size)  # refuse a bad size before torch is imported
    where = make_executor(executor, workers, address)
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.dequantize import run_dequantize

    output = Output(json_path=json, quiet=quiet)
    quiet_libraries()
    steps = ["dequantize", "verify"] if verify else ["dequantize"]
    with output.stages(steps) as on_step:
        progress = on_step.counter("tensors written") if on_step else None
        report = run_dequantize(
            source,
            out,
            dtype=dtype,
            max_shard_size=max_shard_size,
            verify=verify,
            force=force,
            on_step=on_step,
            progress=progress,
            executor=where,
        )
    output.report(report)
    raise typer.Exit(0 if report.ok else 1)
