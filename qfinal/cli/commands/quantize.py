from __future__ import annotations

from typing import Annotated, Optional

import typer

from qfinal.cli.options import (
    AddressOpt,
    DoubleQuantOpt,
    ExecutorOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    ShardOpt,
    WorkersOpt,
)


def quantize(
    source: Annotated[str, typer.Argument(help="A dense safetensors checkpoint folder (or cached hub id).")],
    out: Annotated[str, typer.Argument(help="Output folder for the bitsandbytes checkpoint.")],
    quantize: Annotated[str, typer.Option("--quantize", help="nf4|fp4|int8.")] = "nf4",
    double_quant: DoubleQuantOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="float16|bfloat16|float32 (default: from config.json).")] = None,
    compute_dtype: Annotated[
        Optional[str], typer.Option(help="bnb_4bit_compute_dtype: float16|bfloat16|float32.")
    ] = None,
    quant_storage: Annotated[Optional[str], typer.Option(help="bnb_4bit_quant_storage: uint8|float16|...")] = None,
    skip_modules: Annotated[
        Optional[list[str]], typer.Option("--skip-module", help="llm_int8_skip_modules entry (repeatable).")
    ] = None,
    int8_threshold: Annotated[Optional[float], typer.Option(help="llm_int8_threshold.")] = None,
    max_shard_size: ShardOpt = "50GB",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be written and the memory needed.")
    ] = False,
    force: ForceOpt = False,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Quantize a dense checkpoint to bitsandbytes nf4/fp4/int8 tensor by tensor, as transformers would save it."""
    from qfinal.ops.executors import make_executor
    from qfinal.ops.quantize import check_options
    from qfinal.sizes import parse_size

    check_options(quantize, bool(double_quant))
    parse_size(max_shard_size)  # refuse a bad size before torch is imported
    where = make_executor(executor, workers, address)
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.quantize import run_quantize

    settings = {
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "quant_storage": quant_storage,
        "skip_modules": skip_modules,
        "int8_threshold": int8_threshold,
    }
    output = Output(json_path=json, quiet=quiet)
    quiet_libraries()
    with output.stages(["plan"] if dry_run else ["plan", "quantize"]) as on_step:
        progress = on_step.counter("tensors written") if on_step else None
        report = run_quantize(
            source,
            out,
            method=quantize,
            double_quant=bool(double_quant),
            dry_run=dry_run,
            force=force,
            max_shard_size=max_shard_size,
            progress=progress,
            on_step=on_step,
            executor=where,
            **{k: v for k, v in settings.items() if v is not None},
        )
    output.report(report)
    raise typer.Exit(0 if report.ok else 1)
