from __future__ import annotations

from typing import Annotated, Optional

import typer

from qfinal.cli.options import (
    AddressOpt,
    AllowPickleOpt,
    DoubleQuantOpt,
    ExecutorOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    WorkersOpt,
)


def merge(
    base: Annotated[str, typer.Argument(help="The base checkpoint folder (dense, or bitsandbytes for QLoRA).")],
    out: Annotated[str, typer.Argument(help="Output folder for the merged plain checkpoint.")],
    adapter: Annotated[list[str], typer.Option("--adapter", help="PEFT adapter folder (repeatable; merged in order).")],
    dtype: Annotated[
        Optional[str], typer.Option(help="float16|bfloat16|float32 (default: as stored; float16 for a bnb base).")
    ] = None,
    base_weights: Annotated[
        Optional[str], typer.Option(help="bnb base only: merge into this dense original instead of the 4-bit weights.")
    ] = None,
    compare: Annotated[
        Optional[bool],
        typer.Option("--compare/--no-compare", help="Logits of OUT vs the unmerged base (default: bnb base)."),
    ] = None,
    quantize: Annotated[
        Optional[str],
        typer.Option("--quantize", help="nf4|fp4|int8: requantize the merge, as `qfinal quantize` would write it."),
    ] = None,
    double_quant: DoubleQuantOpt = None,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be written and the memory; write nothing.")
    ] = False,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    json: JsonOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Merge PEFT adapters into a base shard by shard, bit-identical to peft's merge_and_unload."""
    from qfinal.checkpoint.dtypes import check_output_dtype
    from qfinal.ops.executors import make_executor
    from qfinal.ops.merge_quantize import check_quantize

    check_output_dtype(dtype)
    check_quantize(quantize, bool(double_quant))
    chosen = make_executor(executor, workers, address)
    from qfinal.cli.output import Output, quiet_libraries
    from qfinal.ops.merge import run_merge

    output = Output(json_path=json, quiet=quiet)
    quiet_libraries()
    with output.stages(["merge"] if quantize is None else ["merge", "quantize"]) as on_step:
        if on_step:
            on_step("merge")
        progress = on_step.counter("tensors written") if on_step else None
        report = run_merge(
            base,
            out,
            adapter,
            dtype=dtype,
            base_weights=base_weights,
            allow_pickle=allow_pickle,
            dry_run=dry_run,
            compare=compare,
            quantize=quantize,
            double_quant=bool(double_quant),
            force=force,
            executor=chosen,
            progress=progress,
            on_quantize=(lambda: on_step("quantize")) if on_step else None,
        )
    output.report(report)
    raise typer.Exit(0 if report.ok else 1)
