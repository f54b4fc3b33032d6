"""`qfinal quantize`: a dense safetensors checkpoint to a bitsandbytes nf4 / fp4 / int8 one, streamed.

transformers quantizes a checkpoint by building the model (`from_pretrained(...,
quantization_config=...)`) and writes it with `save_pretrained`: the whole model in memory. Here
every decision is transformers' own, taken on the meta skeleton (`ops.quantize_plan`), and the
tensors are computed one at a time: each is read (pread), cast to the dtype the loader would cast
it to, transposed for Conv1D, quantized with bitsandbytes' arithmetic (the 4-bit kernel of
`formats.bnb_kernel`, byte-identical) and written at its offset in its shard
(`checkpoint.writer.ShardWriter`); large tensors a slab of rows at a time (`ops.quantize_pieces`).
Peak memory is one slab (or small tensor) and its outputs, whatever the model's size. Output goes
through `atomic_dir`: complete or absent.

`quantize_shard(spec)` writes one shard; it is a top-level function of plain data so that an
executor may run the shards anywhere that sees the same files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qfinal.errors import ConfigError
from qfinal.ops.quantize_plan import QuantOptions, ShardSpec, TensorJob
from qfinal.report import Report

METHODS = ("nf4", "fp4", "int8")


@dataclass
class QuantizePlan:
    """What will be written: the shards, the index's totals, the modules converted and kept."""

    specs: list[ShardSpec]
    total_size: int
    total_parameters: int
    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys transformers drops
    largest_input: int = 0  # bytes of the largest tensor read
    model: object = None  # the meta skeleton (config writing)
    source: object = None


# --------------------------------------------------------------------------- one shard


def nested_offset(job: TensorJob, src, options: QuantOptions) -> float:
    """The double-quant offset (the absmax mean) of one weight: it goes into the JSON quant state,
    whose length the shard header needs before the weight is written."""
    from qfinal.ops.quantize_pieces import row_step, whole_absmax

    plain = QuantOptions(options.method, False, options.quant_storage)
    return whole_absmax(src, job, plain, row_step(job, src.headers[job.key])).mean().item()


def quantize_shard(spec: ShardSpec) -> None:
    """Write one output shard into `spec.out_dir`, reading only the tensors it is made of; each
    tensor done is one unit of progress (`ops.executors.advance`)."""
    import torch

    from qfinal.checkpoint.writer import ShardWriter
    from qfinal.ops.dequantize_plan import SourceReader
    from qfinal.ops.executors import advance
    from qfinal.ops.quantize_pieces import computed

    wanted = set(spec.names)
    entries = [(n, getattr(torch, dt), shape) for job in spec.jobs for n, dt, shape in job.outputs if n in wanted]
    src = SourceReader(Path(spec.source), Path(spec.confine_to))
    try:
        with ShardWriter(Path(spec.out_dir) / spec.file_name, entries, metadata={"format": "pt"}) as writer:
            for job in spec.jobs:
                for name, at, tensor in computed(job, src, spec.options):
                    if name in wanted:
                        if at is None:
                            writer.write(name, tensor)
                        else:
                            writer.write_part(name, at, tensor)
                    del tensor
                advance()
    finally:
        src.close()


# --------------------------------------------------------------------------- the run


def check_options(method: str, double_quant: bool) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown quantization {method!r}", where="--quantize", hint="use nf4, fp4 or int8")
    if double_quant and method == "int8":
        raise ConfigError("double quantization applies to nf4/fp4 only", where="--double-quant")


def peak_estimate(plan: QuantizePlan, baseline: int) -> int:
    """Peak RSS the run needs: what the process holds after planning, plus the largest slab read,
    its cast copy and its fp32 view (bnb's partial-block path) and the outputs."""
    return baseline + 3 * plan.largest_input + 4 * max(plan.largest_input // 2, 1)


def run_quantize(
    source: Path | str,
    out: Path | str,
    *,
    method: str,
    double_quant: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_step: Callable[[str], None] | None = None,
    executor=None,
    outline: bool = False,
    **settings,
) -> Report:
    """`qfinal quantize` as a library call. `settings`: dtype, compute_dtype, quant_storage,
    skip_modules, int8_threshold, max_shard_size (the config's names). Returns the report.
    `outline` (a dry run of a checkpoint whose data are holes): double quantization's offsets are
    taken as 0.0, not read."""
    from qfinal.ops.quantize_run import plan_quantize, write_quantized
    from qfinal.pipeline.context import peak_rss_bytes
    from qfinal.report import StageRecord

    check_options(method, double_quant)
    start = time.perf_counter()
    if on_step:
        on_step("plan")
    plan, report = plan_quantize(
        source, out, method=method, double_quant=double_quant, force=force, outline=outline and dry_run, **settings
    )
    files = [s.file_name for s in plan.specs]
    peak = peak_estimate(plan, peak_rss_bytes())
    report.stages.append(
        StageRecord(
            name="plan",
            seconds=round(time.perf_counter() - start, 6),
            peak_rss_bytes=peak_rss_bytes(),
            detail=f"{'would write' if dry_run else 'writes'} {len(plan.converted)} quantized module(s) in "
            f"{len(files)} shard(s) ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}), "
            f"{plan.total_size:,} bytes of tensors; peak memory needed about {peak / 2**30:.2f} GiB",
        )
    )
    report.extra["quantize"] = {
        "out": str(out),
        "files": files,
        "total_bytes": plan.total_size,
        "peak_rss_estimate_bytes": peak,
        "dry_run": dry_run,
    }
    if dry_run:
        return report
    start = time.perf_counter()
    if on_step:
        on_step("quantize")
    from qfinal.ops.executors import TaskStats, worker_peak_note

    stats = TaskStats()
    written = write_quantized(plan, Path(out), force=force, progress=progress, executor=executor, stats=stats)
    report.extra["quantize"]["files"] = written
    report.extra["quantize"]["worker_peak_bytes"] = stats.worker_peak_bytes
    report.stages.append(
        StageRecord(
            name="quantize",
            seconds=round(time.perf_counter() - start, 6),
            peak_rss_bytes=peak_rss_bytes(),
            detail=f"{sum(len(s.jobs) for s in plan.specs)} tensor(s) read, {len(written)} file(s) written"
            + worker_peak_note(stats.worker_peak_bytes),
        )
    )
    return report
