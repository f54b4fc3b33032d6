"""`qfinal quantize`'s two halves: `plan_quantize` (the meta skeleton and transformers' decisions ->
shard specs) and `write_quantized` (the shards, the index and the config, into an atomic folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qfinal.checkpoint.atomic import atomic_dir, check_output_dir
from qfinal.checkpoint.side_files import copy_side_files
from qfinal.checkpoint.sources import read_config_json, resolve_source
from qfinal.errors import CheckpointError, ConfigError, OutputError
from qfinal.ops.quantize import QuantizePlan, nested_offset, quantize_shard
from qfinal.ops.quantize_plan import (
    QuantOptions,
    TensorJob,
    four_bit_outputs,
    int8_outputs,
    missing_from_checkpoint,
    nbytes,
    shard_specs,
)
from qfinal.report import Finding, Report
from qfinal.sizes import parse_size

DEFAULT_SHARD = "50GB"  # save_pretrained's default
_WRITTEN_BY_US = ("config.json", "generation_config.json", "model.safetensors.index.json")


def _skeleton(src, report: Report, **settings):
    """Run meta_init + quantizer_preprocess: the model on meta with transformers' bnb modules swapped in."""
    from qfinal.config import build_config
    from qfinal.pipeline.context import Context
    from qfinal.pipeline.runner import default_stages, run_pipeline

    cfg = build_config(None, **settings)
    ctx = Context(source=src, config=cfg, report=report)
    run_pipeline(ctx, [s for s in default_stages() if s.name in ("meta_init", "quantizer_preprocess")])
    if ctx.inventory.format != "safetensors":
        raise CheckpointError(
            "quantize reads safetensors checkpoints", where=src.label, hint="use `qfinal save --quantize` instead"
        )
    from qfinal.pipeline.stages.postprocess import load_generation_config

    load_generation_config(ctx.model, src.folder)  # what from_pretrained gives the model, then saves
    return ctx


def _jobs(ctx, reader, keys, options: QuantOptions, where: str, outline: bool = False) -> dict[str, TensorJob]:
    from qfinal.compat.transformers_save import loader_dtypes

    converted = {c.module for c in ctx.report.keys.converted}
    quantized = {k for k in keys if k.endswith(".weight") and k.rpartition(".")[0] in converted}
    dtypes = loader_dtypes(ctx.model, keys, ctx.dtype, quantized)
    meta = ctx.model.state_dict(keep_vars=True)
    jobs = {}
    for key in keys:
        _st, shape = reader.headers[key]
        cast = str(dtypes[key]).removeprefix("torch.")
        if key not in quantized:
            if list(meta[key].shape) != list(shape):
                raise CheckpointError(
                    f"{key!r} has shape {list(shape)} in the checkpoint, the model expects {list(meta[key].shape)}",
                    where=where,
                )
            jobs[key] = TensorJob(key, "copy", cast, outputs=[(key, cast, tuple(shape))])
            continue
        transpose = ctx.original_classes.get(key.rpartition(".")[0]) == "Conv1D"
        shape = tuple(shape[::-1] if transpose else shape)
        if options.method == "int8":
            jobs[key] = TensorJob(key, "int8", cast, transpose, int8_outputs(key, shape))
            continue
        job = TensorJob(key, "4bit", cast, transpose)
        if options.double_quant:
            job.offset = 0.0 if outline else nested_offset(job, reader, options)
        job.outputs = four_bit_outputs(key, shape, cast, options, job.offset)
        jobs[key] = job
    return jobs


def plan_quantize(
    source,
    out,
    *,
    method: str,
    double_quant: bool = False,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD,
    outline: bool = False,
    **settings,
) -> tuple[QuantizePlan, Report]:
    """The plan and the report so far (converted / skipped modules, dropped keys); reads the headers
    and, for double quantization, each weight's absmax (with `outline`, data that are holes: not
    read, the offsets taken as 0.0)."""
    from qfinal.compat.transformers_save import saved_keys, total_parameters
    from qfinal.ops.dequantize_plan import SourceReader

    max_bytes = parse_size(max_shard_size)
    resolved = resolve_source(source)
    folder, where = resolved.folder, resolved.label
    if isinstance(read_config_json(folder).get("quantization_config"), dict):
        raise ConfigError(
            "the checkpoint is already quantized (config.json has a quantization_config)",
            where=where,
            hint="quantize reads a dense checkpoint; `qfinal dequantize` writes one",
        )
    if Path(out).resolve() == folder.resolve():
        raise OutputError("output folder is the source folder", where=str(out), hint="write it somewhere else")
    check_output_dir(Path(out), force)
    report = Report(source=where, command="quantize")
    options = QuantOptions(method, double_quant, settings.get("quant_storage") or "uint8")
    ctx = _skeleton(resolved, report, quantize=method, double_quant=double_quant, **settings)
    keys = saved_keys(ctx.model)
    reader = SourceReader(folder, resolved.confine_to)
    try:
        missing_from_checkpoint(keys, reader.headers, where)
        jobs = _jobs(ctx, reader, keys, options, where, outline)
    finally:
        reader.close()
    from qfinal.compat.transformers_save import save_order

    def order(names):
        return save_order(ctx.model, ctx.hf_quantizer, names)

    specs, total = shard_specs(keys, jobs, max_bytes, folder, resolved.confine_to, options, order)
    four_bit = {j.key: nbytes(*j.outputs[0][1:]) for j in jobs.values() if j.kind == "4bit"}  # the packed weights
    meta = set(ctx.model.state_dict(keep_vars=True))
    plan = QuantizePlan(
        specs=specs,
        total_size=total,
        total_parameters=total_parameters(ctx.model, four_bit),
        converted=[c.model_dump(by_alias=True) for c in report.keys.converted],
        skipped=[s.model_dump() for s in report.keys.skipped],
        unexpected=sorted(set(reader.headers) - meta),
        largest_input=max((_input_bytes(jobs[k], reader.headers[k]) for k in keys), default=0),
        model=ctx.model,
        source=resolved,
    )
    report.keys.unexpected = plan.unexpected
    for key in plan.unexpected:
        report.findings.append(
            Finding(check="unexpected_keys", severity="info", key=key, message="not in the model: not written")
        )
    return plan, report


def _input_bytes(job: TensorJob, header) -> int:
    """Bytes read at once for `job`: the whole tensor, or one slab of rows (`ops.quantize_pieces`)."""
    import math

    from qfinal.checkpoint.dtypes import element_size
    from qfinal.ops.quantize_pieces import row_step

    st_dtype, shape = header
    step = row_step(job, header)
    rows = shape[0] if step is None else step
    return rows * math.prod(shape[1:]) * element_size(st_dtype) if shape else element_size(st_dtype)


def write_quantized(
    plan: QuantizePlan,
    out: Path,
    *,
    force: bool,
    progress: Callable[[int, int], None] | None = None,
    executor=None,
    stats=None,
) -> list[str]:
    """Every shard (one task each on `executor`, `ops.executors`), the index when sharded,
    config.json and generation_config.json, atomically; `stats` (`ops.executors.TaskStats`) gets
    what the workers reported."""
    from qfinal.checkpoint.writer import INDEX_FILE, write_index
    from qfinal.compat.transformers_save import write_configs
    from qfinal.ops.executors import run_tasks

    written: list[str] = []
    with atomic_dir(out, force=force) as tmp:
        weight_map = {}
        for spec in plan.specs:
            spec.out_dir = str(Path(tmp).resolve())
            weight_map.update(dict.fromkeys(spec.names, spec.file_name))
        labels = [spec.file_name for spec in plan.specs]
        units = [len(spec.jobs) for spec in plan.specs]
        preload = ("bitsandbytes",)  # imported once by a pool's forkserver, not by each worker
        run_tasks(
            quantize_shard,
            plan.specs,
            executor,
            labels=labels,
            units=units,
            progress=progress,
            preload=preload,
            stats=stats,
        )
        written += labels
        if len(plan.specs) > 1:
            write_index(tmp, weight_map, plan.total_size, plan.total_parameters)
            written.append(INDEX_FILE)
        written += write_configs(plan.model, tmp)
        written += copy_side_files(plan.source.folder, plan.source.confine_to, tmp, skip=_WRITTEN_BY_US)
    return sorted(written)
