"""The options several commands share, declared once, and how they become config overrides."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

# Options shared by several commands, declared once.
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(help="Quantize on load: none|nf4|fp4|int8.")]
DoubleQuantOpt = Annotated[
    Optional[bool],
    typer.Option("--double-quant/--no-double-quant", help="Nested quantization for nf4/fp4.", show_default=False),
]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float16|bfloat16|float32 (default: from config.json).")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="cpu|auto.")]
MaxMemoryOpt = Annotated[
    Optional[str], typer.Option(help="Per-device budget for --device-map auto, e.g. 'cpu=2GiB,disk=20GiB'.")
]
OffloadOpt = Annotated[Optional[str], typer.Option(help="Folder for disk offload.")]
AdapterOpt = Annotated[Optional[list[str]], typer.Option("--adapter", help="PEFT adapter folder (repeatable).")]
MergeOpt = Annotated[bool, typer.Option("--merge", help="Merge the adapters into the base weights.")]
DequantizeOpt = Annotated[bool, typer.Option("--dequantize", help="Dequantize a bnb checkpoint after loading.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Allow .bin/.pt pickle checkpoints (loaded with torch.load(weights_only=True) only)."
    ),
]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the report as JSON to FILE ('-' for stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; rely on the exit code.")]
StopAfterOpt = Annotated[Optional[str], typer.Option(help="Stop the pipeline after this stage.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
ShardOpt = Annotated[str, typer.Option(help="Largest output shard, e.g. 2GB or 500MB.")]
# Where per-shard work runs (qfinal/ops/executors.py).
ExecutorOpt = Annotated[
    Optional[str],
    typer.Option(help="Where output shards are written: inprocess|pool|ray (default: inprocess; pool with --workers)."),
]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Write N shards at a time on local worker processes.")]
AddressOpt = Annotated[
    Optional[str],
    typer.Option(help="--executor ray: the cluster's address (default: RAY_ADDRESS, else the local cluster)."),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option(help="Hub id only: branch, tag or commit hash (a commit hash pins exactly that commit)."),
]
OfflineOpt = Annotated[
    Optional[bool],
    typer.Option("--offline", help="Hub id only: use the local cache, never download.", show_default=False),
]


def parse_max_memory(text: str | None) -> dict | None:
    from qfinal.errors import ConfigError

    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        device, sep, amount = part.partition("=")
        if not sep or not device.strip() or not amount.strip():
            raise ConfigError(
                f"cannot parse {part!r}", where="--max-memory", hint="use DEVICE=SIZE pairs, e.g. cpu=2GiB,disk=20GiB"
            )
        device = device.strip()
        out[int(device) if device.isdigit() else device] = amount.strip()
    return out


# The options that set a field of RunConfig (through config.OVERRIDE_PATHS, or translated by
# config_overrides); every other option is about this run's inputs and outputs.
PIPELINE_OPTIONS = (
    "quantize",
    "double_quant",
    "dtype",
    "device_map",
    "max_memory",
    "offload_folder",
    "adapter",
    "merge",
    "dequantize",
    "stop_after",
    "revision",
    "offline",
)


def run_config(config_file: str | None, options: dict):
    """A command's RunConfig: its YAML file, overridden by the pipeline options it was given
    (`options` is the command's locals(): the ones in PIPELINE_OPTIONS are taken)."""
    from qfinal.config import build_config

    given = {name: options[name] for name in PIPELINE_OPTIONS if name in options}
    return build_config(config_file, **config_overrides(**given))


def config_overrides(
    *,
    max_memory: str | None = None,
    adapter: list[str] | None = None,
    merge: bool = False,
    dequantize: bool = False,
    **fields,
) -> dict:
    """A command's config options -> the keyword overrides `qfinal.load` takes (None keeps the YAML's).

    `fields` are options named like their config field or like an entry of config.OVERRIDE_PATHS
    (`quantize` sets `quantize.method`); the rest need translating: `--max-memory cpu=2GiB`,
    `--adapter DIR` (repeatable) with `--merge`, and `--dequantize` (a flag that cannot say "keep").
    tests/test_cli_options.py checks every option of every command against RunConfig."""
    overrides = dict(fields, max_memory=parse_max_memory(max_memory), dequantize=dequantize or None)
    if adapter:
        overrides["adapters"] = [{"path": p, "merge": merge} for p in adapter]
    elif merge:
        overrides["merge_all_adapters"] = True
    return overrides


def output_path(text: str):
    from pathlib import Path

    return Path(text).expanduser()


def check_output_file(text: str, option: str) -> None:
    """Refuse an output file whose folder is missing before minutes of loading, not after."""
    import os

    from qfinal.errors import OutputError

    path = output_path(text)
    parent = path.resolve().parent
    if path.is_dir():
        raise OutputError("is a folder", where=f"{option} {text}", hint="give a file name")
    if not parent.is_dir():
        raise OutputError("folder does not exist", where=f"{option} {text}", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError("folder is not writable", where=f"{option} {text}", hint="choose a writable location")
