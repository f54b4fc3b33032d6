from __future__ import annotations

from typing import Annotated

import typer

from qfinal.cli.options import ForceOpt, JsonOpt, QuietOpt, ShardOpt


def dequantize(
    source: Annotated[str, typer.Argument(help="A bitsandbytes nf4/fp4/int8 checkpoint folder (or cached hub id).")],
    out: Annotated[str, typer.Argument(help="Output folder for the plain checkpoint.")],
    dtype: Annotated[str, typer.Option(help="float16|bfloat16|float32.")] = "float16",
    max_shard_size: ShardOpt = "2GB",
    verify: Annotated[bool, typer.Option("--verify", help="Reload OUT with plain transformers and compare.")] = False,
    force: ForceOpt = False, json: JsonOpt = None, quiet: QuietOpt = False,
) -> int:
    """Stream a bnb checkpoint back to plain fp16/bf16/fp32 safetensors, shard by shard."""
    from qfinal.errors import ConfigError
    from qfinal.sizes import parse_size

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"unknown dtype {dtype!r}", where="--dtype", hint="use float16, bfloat16 or float32")
    parse_size(max_shard_size)  # refuse a bad size before torch is imported
    from qfinal.ops.dequantize import run_dequantize
    from qfinal.cli.output import Output, quiet_libraries

    output = Output(json_path=json, quiet=quiet)
    quiet_libraries()
    report = run_dequantize(source, out, dtype=dtype, max_shard_size=max_shard_size, verify=verify, force=force,
                            progress_console=output.err if output.interactive else None)
    output.report(report)
    raise typer.Exit(0 if report.ok else 1)
