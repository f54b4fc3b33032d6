"""`qfinal dequantize`: turn a quantized (bitsandbytes nf4 / fp4 / int8) checkpoint back into a plain one.

transformers can dequantize a loaded model (`model.dequantize(dtype)`), but the result cannot be
saved, only the quantized layers get the requested dtype, and Conv1D models (GPT-2) come out in
nn.Linear layout so the saved folder would not load. This works on the files instead, streaming:

* each input tensor is read on its own with pread: nothing stays mapped, at most two files open;
* each quantized weight is rebuilt by its format (`qfinal.formats`) along the exact path of
  transformers' dequantization, then cast once to `dtype`: bit for bit `model.dequantize(dtype)`'s
  weight; Conv1D weights are transposed back to the checkpoint's [in, out] layout;
* every other floating tensor is the source tensor cast to `dtype`; other tensors pass unchanged;
* output shards are planned up front from the headers (`writer.plan_shards`); each tensor's bytes
  are written as soon as it is computed (`writer.write_safetensors_streaming`), so peak memory is
  one output tensor plus the source tensors it is made of. The files are `save_file`'s, byte for byte.
* each output shard is one task (`write_shard`), run in this process, on a local process pool or
  on Ray (`ops.executors`): the same bytes whichever; peak memory is then that much per worker.

What to write is planned from the headers in `ops.dequantize_plan`; the proof that OUT is right
(`--verify`) is `ops.dequantize_verify`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qfinal.checkpoint import writer as _shards
from qfinal.checkpoint.atomic import atomic_dir, check_output_dir
from qfinal.checkpoint.side_files import copy_side_files
from qfinal.checkpoint.sources import Source, read_config_json, resolve_source, stamp_report
from qfinal.errors import CheckpointError, ConfigError, OutputError
from qfinal.ops.dequantize_plan import PlanItem, SourceReader, plan_items, stored_format
from qfinal.ops.executors import Executor, TaskStats, run_tasks, worker_peak_note
from qfinal.report import Report
from qfinal.sizes import parse_size

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Files that are weights (or indexes of weights) and must not be copied to OUT.
# Heavy libraries a shard task imports (bitsandbytes pulls in torch.compile's machinery): a pool's
# forkserver imports those the planning loaded once, not each worker.
_WORKER_LIBRARIES = ("bitsandbytes",)


@dataclass
class DequantizeResult:
    out: Path
    dtype: str  # "float16" | "bfloat16" | "float32"
    quant_method: str  # "nf4" | "fp4" | "int8"
    double_quant: bool
    dequantized: list[str] = field(default_factory=list)  # weights rebuilt from quantized data
    cast: list[str] = field(default_factory=list)  # other tensors (cast if floating)
    files: list[str] = field(default_factory=list)  # every file written to OUT
    total_bytes: int = 0  # tensor bytes over all shards (the index's total_size)
    source: Source | None = None  # SOURCE as resolved (a hub id: its commit), for --verify and the report


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ConfigError(f"unsupported dtype {dtype!r}", hint="use float16, bfloat16 or float32")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- computing tensors


class _Scratch:
    """One output buffer, reused for every cast. A cast into warm pages is about twice as fast as
    one into a fresh allocation, whose pages the kernel must first map and zero. Its size is the
    largest output tensor; each tensor is written out before the next one is cast into the buffer."""

    def __init__(self) -> None:
        self._bytes: torch.Tensor | None = None

    def take(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._bytes is None or self._bytes.numel() < nbytes:
            self._bytes = None  # free the smaller buffer before allocating the larger one
            self._bytes = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)


def _cast(value: torch.Tensor, item: PlanItem, scratch: _Scratch | None) -> torch.Tensor:
    """`value` (transposed for Conv1D) as `item.dtype`, contiguous: bit for bit
    `value.to(dtype).t().contiguous()`, as the cast is element-wise; in `scratch` when given."""
    if item.transpose:
        value = value.t()
    if list(value.shape) != item.shape:
        return value  # materialize reports the shape
    if value.dtype == item.dtype and value.is_contiguous():
        return value
    if scratch is None:
        return value.to(item.dtype).contiguous()
    return scratch.take(item.shape, item.dtype).copy_(value)


def materialize(item: PlanItem, src: SourceReader, where: str, scratch: _Scratch | None = None) -> torch.Tensor:
    """The output tensor for `item`. With `scratch`, the result may live in its buffer: valid only
    until the next call."""
    if item.kind == "copy":
        return _cast(src.get(item.parts["tensor"]), item, scratch)
    value = item.fmt.dequantize(item.weight, src.get, where)
    # dequantize_and_replace: "dequantized in <quant dtype> and casted to <dtype>".
    value = _cast(value, item, scratch)
    if list(value.shape) != item.shape:
        raise CheckpointError(
            f"dequantized shape {list(value.shape)} differs from the quant state's {item.shape}",
            where=f"{where}: {item.name}",
        )
    return value


# --------------------------------------------------------------------------- writing OUT


def _write_config(config: dict, dtype: torch.dtype, path: Path) -> None:
    config = json.loads(json.dumps(config))  # deep copy
    for key in ("quantization_config", "_pre_quantization_dtype", "torch_dtype"):
        config.pop(key, None)
    config["dtype"] = dtype_name(dtype)
    # Sub-configs (e.g. text_config) carry their own dtype: keep them consistent.
    for value in config.values():
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            value.pop("torch_dtype", None)
            value["dtype"] = dtype_name(dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _shard(items: list[PlanItem], max_bytes: int, result: DequantizeResult):
    """(shards of items, their file names, weight map); fills the result's lists and byte count."""
    by_name = {item.name: item for item in items}
    shards = [
        [by_name[name] for name in names]
        for names in _shards.plan_shards(((it.name, it.nbytes) for it in items), max_bytes)
    ]
    names = _shards.shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    for shard, name in zip(shards, names):
        for item in shard:
            (result.dequantized if item.kind != "copy" else result.cast).append(item.name)
            weight_map[item.name] = name
            result.total_bytes += item.nbytes
    return shards, names, weight_map


@dataclass
class ShardTask:
    """One output shard, everything a worker needs to write it (picklable; absolute paths)."""

    path: str  # the shard file in the temporary output folder
    items: list[PlanItem]
    files: dict[str, str]  # source key -> its file, for the keys these items are made of
    where: str  # the source's label, for errors


def write_shard(task: ShardTask) -> str:
    """Write one output shard, each tensor computed only when the writer asks for it, with a reader
    of its own (so it runs anywhere the paths are visible); returns the shard's file name."""
    from qfinal.checkpoint.reader import TensorReader
    from qfinal.ops.executors import advance

    scratch = _Scratch()
    with TensorReader(task.files, max_open=2, backend="pread") as src:

        def computed():
            for item in task.items:
                tensor = materialize(item, src, task.where, scratch)
                yield item.name, tensor
                del tensor  # written: drop it before computing the next one
                advance()

        _shards.write_safetensors_streaming(
            Path(task.path),
            [(item.name, item.dtype, item.shape) for item in task.items],
            computed(),
            metadata={"format": "pt"},
        )
    return Path(task.path).name


def _write(
    tmp: Path,
    src: SourceReader,
    sharded,
    result: DequantizeResult,
    where: str,
    progress: Callable[[int, int], None] | None,
    executor: Executor | None,
    stats: TaskStats | None = None,
) -> None:
    """The shards (one task each, on `executor`) and the index of OUT."""
    shards, names, weight_map = sharded
    tmp = tmp.resolve()
    tasks = [
        ShardTask(
            str(tmp / name),
            shard,
            {key: str(Path(src.files[key]).resolve()) for item in shard for key in item.parts.values()},
            where,
        )
        for shard, name in zip(shards, names)
    ]
    units = [len(shard) for shard in shards]
    preload = [name for name in _WORKER_LIBRARIES if name in sys.modules]  # what planning needed
    written = run_tasks(
        write_shard, tasks, executor, labels=names, units=units, progress=progress, preload=preload, stats=stats
    )
    result.files.extend(written)
    if len(shards) > 1:
        _shards.write_index(tmp, weight_map, result.total_bytes)
        result.files.append(_shards.INDEX_FILE)


def dequantize_checkpoint(
    source: Path | str | Source,
    out: Path,
    *,
    dtype: torch.dtype | str = torch.float16,
    max_shard_size: int | str = "2GB",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
    stats: TaskStats | None = None,
) -> DequantizeResult:
    """Write OUT: SOURCE's quantized checkpoint dequantized to `dtype`, loadable by plain `from_pretrained`.
    Each output shard is one task on `executor` (default: in this process); the bytes are the same.
    `stats` gets what the workers reported (`ops.executors.TaskStats`)."""
    from qfinal.compat.transformers_layout import conv1d_layout

    dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    out = Path(out)
    resolved = resolve_source(source)
    folder, where = resolved.folder, resolved.label
    if out.resolve() == folder.resolve():
        raise OutputError(
            "output folder is the source folder", where=str(out), hint="write the dequantized checkpoint somewhere else"
        )
    # The source is checked before OUT: check_output_dir creates OUT's parent, which a refused
    # source must not leave behind.
    config = read_config_json(folder)
    fmt, scheme = stored_format(config, where)
    check_output_dir(out, force)  # fail fast; atomic_dir checks again before writing
    # The loader's own checks (duplicate names, index vs shards, confinement, exact layout), which
    # safe_open alone does not make; the first problem is refused with the file and key named.
    from qfinal.checkpoint.inventory import inspect_checkpoint

    inspect_checkpoint(folder, confine_to=resolved.confine_to).raise_for_problems()
    conv1d, shapes, prefix = conv1d_layout(folder, where, config)
    src = SourceReader(folder, resolved.confine_to)
    try:
        items = plan_items(src, dtype, fmt, scheme, conv1d, shapes, prefix, where)
        result = DequantizeResult(
            out=out,
            dtype=dtype_name(dtype),
            quant_method=scheme.method,
            double_quant=scheme.double_quant,
            source=resolved,
        )
        sharded = _shard(items, max_bytes, result)
        with atomic_dir(out, force=force) as tmp:
            _write(tmp, src, sharded, result, where, progress, executor, stats)
            _write_config(config, dtype, tmp / "config.json")
            result.files.append("config.json")
            result.files.extend(copy_side_files(folder, resolved.confine_to, tmp))
    finally:
        src.close()
    result.files.sort()
    return result


# --------------------------------------------------------------------------- command


def run_dequantize(
    source: Path | str,
    out: Path | str,
    *,
    dtype: str = "float16",
    max_shard_size: int | str = "2GB",
    verify: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_step: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> Report:
    """`qfinal dequantize` as a library call: the streaming write, then (optionally) the proof.
    `progress(done, total)` is called after each tensor is written (on Ray: as each shard is),
    `on_step(name)` as each of "dequantize" and "verify" starts."""
    import time

    from qfinal.pipeline.context import peak_rss_bytes
    from qfinal.report import ConvertedModule, StageRecord

    report = Report(source=str(source), command="dequantize", dtype=dtype)
    start = time.perf_counter()
    if on_step:
        on_step("dequantize")
    stats = TaskStats()
    result = dequantize_checkpoint(
        source,
        Path(out),
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        progress=progress,
        executor=executor,
        stats=stats,
    )
    stamp_report(report, result.source)
    report.quantization = result.quant_method + ("+double_quant" if result.double_quant else "")
    report.model_class = (read_config_json(Path(out)).get("architectures") or [None])[0]
    report.stages.append(
        StageRecord(
            name="dequantize",
            seconds=round(time.perf_counter() - start, 6),
            peak_rss_bytes=peak_rss_bytes(),
            detail=f"{len(result.dequantized)} weight(s) dequantized, {len(result.cast)} "
            f"tensor(s) cast, {len(result.files)} file(s) written" + worker_peak_note(stats.worker_peak_bytes),
        )
    )
    report.keys.converted = [
        ConvertedModule.model_validate({"module": n.rsplit(".", 1)[0], "from": report.quantization, "to": dtype})
        for n in result.dequantized
    ]
    ran_on = executor or Executor()
    report.extra["dequantize"] = {
        "out": str(result.out),
        "files": result.files,
        "total_bytes": result.total_bytes,
        "executor": {"kind": ran_on.kind, "workers": ran_on.workers, "worker_peak_bytes": stats.worker_peak_bytes},
    }
    if verify:
        from qfinal.ops.dequantize_verify import verify_dequantized

        start = time.perf_counter()
        if on_step:
            on_step("verify")
        report.findings.extend(verify_dequantized(result.source, Path(out), dtype))  # the commit written
        report.checks = sorted({f.check for f in report.findings})
        report.stages.append(
            StageRecord(
                name="verify",
                seconds=round(time.perf_counter() - start, 6),
                peak_rss_bytes=peak_rss_bytes(),
                detail="reloaded with plain transformers",
            )
        )
    return report
