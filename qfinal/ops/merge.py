"""`qfinal merge BASE OUT --adapter A [--adapter B ...]`: PEFT adapters merged into the base, shard by shard.

peft merges into a model it holds whole (`PeftModel.from_pretrained(base)` + `merge_and_unload()` +
`save_pretrained`). Here the base is never held: each output shard is written from its input
shard's tensors one at a time, and a tensor of a module an adapter targets comes from that
module's merge, made by peft's own layer code (`adapters.deltas`), so the tensors are peft's bit
for bit. Several adapters merge in the order given, each as one `merge_and_unload()` on the
result of the previous one (qfinal load's semantics for merged adapters).

A bnb base (QLoRA) is dequantized tensor by tensor as `qfinal dequantize --dtype` does (transformers'
`model.dequantize(dtype)`), and the adapter merges into that (peft's semantics for a QLoRA merge,
without the requantization its bnb layers would add); `--base-weights DENSE` merges into the dense
original instead. The report then gives the logits change of the merged checkpoint against the
base with the adapters unmerged, on the probe batch.

Planning (`plan_merge`: the shards, from the headers, every adapter loaded and checked) is
separate from the per-shard work (`ops.merge_shard.merge_shard`), which an executor runs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qfinal.adapters.peft_types import describe
from qfinal.checkpoint import writer as _shards
from qfinal.checkpoint.atomic import atomic_dir, refuse_existing
from qfinal.checkpoint.dtypes import check_output_dtype
from qfinal.checkpoint.row_slabs import chunk_bytes
from qfinal.checkpoint.side_files import copy_side_files
from qfinal.checkpoint.sources import Source, read_config_json, resolve_source, stamp_report
from qfinal.errors import ConfigError, OutputError
from qfinal.ops.merge_shard import MergeJob, ShardSpec, release_session, session_for
from qfinal.report import Finding, Report

_FP32 = 4


@dataclass
class MergePlan:
    job: MergeJob
    files: list[tuple[str, list[str]]]  # output shard file -> its tensors
    merged: list[str]  # tensors an adapter changes
    total_bytes: int
    peak_bytes: int  # the estimate of what one process needs
    quantization: str | None
    dtype: str
    model_class: str | None = None
    adapters: list[dict] = field(default_factory=list)
    base_source: Source | None = None  # the base as resolved once (a hub id: one commit for the whole run)


def plan_merge(
    base: Path | str,
    adapters: Sequence[str | tuple[str, str | None]],
    *,
    dtype: str | None = None,
    base_weights: Path | str | None = None,
    allow_pickle: bool = False,
) -> MergePlan:
    """What `merge` will write, decided from the headers, every adapter loaded and checked first
    (a refusal raises here, before OUT is touched). `adapters`: folders, or (folder, name)."""
    from qfinal.pipeline.context import peak_rss_bytes

    check_output_dtype(dtype)
    if not adapters:
        raise ConfigError("no adapter to merge", where="--adapter", hint="name at least one adapter folder")
    resolved = base_source = resolve_source(base)
    config = read_config_json(resolved.folder)
    quantized = _quant_method(config)
    if base_weights is not None:
        if quantized is None:
            raise ConfigError(
                "--base-weights replaces a quantized base's weights; this base is not quantized",
                where=str(base_weights),
            )
        resolved = resolve_source(base_weights)
        config = read_config_json(resolved.folder)
        if _quant_method(config) is not None:
            raise ConfigError("--base-weights must be a dense checkpoint", where=str(base_weights))
    job = MergeJob(
        base=str(resolved.folder),
        confine_to=str(resolved.confine_to),
        adapters=tuple(_adapter_pair(a) for a in adapters),
        dtype=dtype or ("float16" if quantized else None),
        config=config,
        allow_pickle=allow_pickle,
    )
    session = session_for(job)
    out = session.base.out
    whole_units = [keys for path, keys in session.unit_keys.items() if path not in session.row_merges]
    biggest_unit = max((sum(_fp32(out[k]) for k in keys) for keys in whole_units), default=0)
    adapter_bytes = sum(m.adapter_bytes for m in session.mergers)
    return MergePlan(
        job=job,
        files=_output_files(session.base.files),
        merged=sorted(session.unit_of),
        total_bytes=sum(o.shape_bytes() for o in out.values()),
        # the process's peak so far (imports, the hollow models), the adapters (a module's
        # tensors where read per module), a module peft merges whole (its tensors and fp32
        # temporaries), the slab buffers (read, delta, its cast, the fp32 sum, the output cast) and
        # the writer's two staging buffers
        peak_bytes=peak_rss_bytes()
        + adapter_bytes
        + 3 * biggest_unit
        + 5 * chunk_bytes()
        + 2 * _shards.PositionalFile.CHUNK,
        quantization=session.base.quantization or quantized,
        dtype=job.dtype or str(session.base.dtype).removeprefix("torch."),
        model_class=(session.base.config.get("architectures") or [None])[0],
        base_source=base_source,
        adapters=[
            {
                "name": m.name,
                "path": str(m.prep.spec.path),
                "peft_type": m.prep.config["peft_type"],
                "kind": describe(m.prep.config),
                "modules": len(m.units),
                "missing": m.missing,
                "held_whole": m.held_whole,  # None: its tensors read from the file module by module
            }
            for m in session.mergers
        ],
    )


def _fp32(out) -> int:
    return out.numel() * _FP32


def _adapter_pair(adapter) -> tuple[str, str | None]:
    """(folder, name); a name not given stays None, for `prepare_all` to name it as `qfinal save` does."""
    path, name = (adapter, None) if isinstance(adapter, (str, Path)) else adapter
    return str(path), name


def _quant_method(config: dict) -> str | None:
    qc = config.get("quantization_config")
    return (qc.get("quant_method") or "quantized") if isinstance(qc, dict) else None


def _output_files(files: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """One output shard per input shard, named as transformers names shards."""
    names = _shards.shard_file_names(len(files))
    return [(name, keys) for name, (_src, keys) in zip(names, files)]


def write_merge(
    plan: MergePlan,
    out: Path | str,
    *,
    force: bool = False,
    executor=None,
    progress: Callable[[int, int], None] | None = None,
    outline: bool = False,
    stats=None,
) -> list[str]:
    """Write OUT from `plan` through `atomic_dir`; returns the files written. With `outline` the
    shards are headers over holes (`merge_shard.outline_shard`): nothing is merged. `stats`
    (`ops.executors.TaskStats`) gets what the workers reported."""
    from qfinal.ops.executors import run_tasks
    from qfinal.ops.merge_shard import merge_shard, outline_shard

    out = Path(out)
    folder = Path(plan.job.base)
    if out.resolve() == folder.resolve():
        raise OutputError("output folder is the base folder", where=str(out), hint="write the merge somewhere else")
    files = [name for name, _keys in plan.files]
    with atomic_dir(out, force=force) as tmp:
        specs = [ShardSpec(plan.job, str(tmp / name), tuple(keys)) for name, keys in plan.files]
        run_tasks(
            outline_shard if outline else merge_shard,
            specs,
            executor,
            labels=[name for name, _k in plan.files],
            units=[len(keys) for _n, keys in plan.files],
            progress=progress,
            stats=stats,
        )
        if len(plan.files) > 1:
            weight_map = {k: name for name, keys in plan.files for k in keys}
            _shards.write_index(tmp, weight_map, plan.total_bytes)
            files.append(_shards.INDEX_FILE)
        _write_config(folder, plan, tmp / "config.json")
        files.append("config.json")
        files += copy_side_files(folder, Path(plan.job.confine_to), tmp)
    return sorted(files)


def _write_config(folder: Path, plan: MergePlan, path: Path) -> None:
    """The base's config.json: as it is for a dense base in its own dtype; else without
    quantization_config and with the output dtype."""
    config = dict(plan.job.config)
    if plan.job.dtype is None and "quantization_config" not in config:
        shutil.copyfile(folder / "config.json", path)
        return
    config.pop("quantization_config", None)
    config.pop("_pre_quantization_dtype", None)
    if plan.job.dtype is not None:
        config.pop("torch_dtype", None)
        config["dtype"] = plan.job.dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run_merge(
    base: Path | str,
    out: Path | str,
    adapters: Sequence[str | tuple[str, str | None]],
    *,
    dtype: str | None = None,
    base_weights: Path | str | None = None,
    allow_pickle: bool = False,
    dry_run: bool = False,
    compare: bool | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
    force: bool = False,
    executor=None,
    progress: Callable[[int, int], None] | None = None,
    on_quantize: Callable[[], None] | None = None,
) -> Report:
    """`qfinal merge` as a library call. `compare` (default: for a quantized base) adds the logits
    change of the merge against the base with the adapters unmerged, on the probe batch. `quantize`
    (nf4|fp4|int8) writes the merge requantized, as `qfinal quantize` would from the plain merge."""
    from qfinal.ops.executors import worker_peak_note
    from qfinal.pipeline.context import peak_rss_bytes
    from qfinal.report import StageRecord

    if quantize is not None or double_quant:
        from qfinal.ops.merge_quantize import check_quantize

        check_quantize(quantize, double_quant)
    if dry_run:  # as the real run would refuse it, before any work
        refuse_existing(Path(out), force)
    start = time.perf_counter()
    quantized = None
    try:
        plan = plan_merge(base, adapters, dtype=dtype, base_weights=base_weights, allow_pickle=allow_pickle)
        report = Report(
            source=str(base),
            command="merge",
            dtype=plan.dtype,
            quantization=plan.quantization or "none",
            model_class=plan.model_class,
        )
        stamp_report(report, plan.base_source)
        info = {
            "out": str(out),
            "dry_run": dry_run,
            "adapters": plan.adapters,
            "merged_tensors": len(plan.merged),
            "files": [name for name, _k in plan.files],
            "total_bytes": plan.total_bytes,
            "peak_bytes_estimate": plan.peak_bytes,
            "base_weights": str(base_weights) if base_weights else None,
        }
        do_compare = not dry_run and (compare if compare is not None else plan.quantization is not None)
        if quantize is not None:
            info["quantize"] = {"method": quantize, "double_quant": double_quant}
            report.quantization = f"{plan.quantization}, then {quantize}" if plan.quantization else quantize
        if dry_run and quantize is not None:
            from qfinal.ops.merge_quantize import plan_requantized

            quantized = plan_requantized(plan, Path(out), method=quantize, double_quant=double_quant, force=force)
            info["files"] = quantized.extra["quantize"]["files"]  # OUT's, as a real run reports them
        if not dry_run:
            quantized = _write(
                plan,
                Path(out),
                info,
                quantize=quantize,
                double_quant=double_quant,
                compare=do_compare,
                force=force,
                executor=executor,
                progress=progress,
                on_quantize=on_quantize,
            )
    finally:
        release_session()
    report.stages.append(
        StageRecord(
            name="merge",
            seconds=round(time.perf_counter() - start, 6),
            peak_rss_bytes=peak_rss_bytes(),
            detail=f"{len(plan.adapters)} adapter(s) into {len(plan.merged)} tensor(s); {len(plan.files)} shard(s)"
            + (
                f" (dry run: nothing written); would write {plan.total_bytes:,} bytes of tensors"
                + (" (a temporary plain merge beside OUT)" if quantize else "")
                + f", peak memory needed about {plan.peak_bytes / 2**30:.2f} GiB"
                if dry_run
                else ""
            )
            + worker_peak_note(info.get("worker_peak_bytes", 0))
            + (f"; then {'would be ' if dry_run else ''}requantized to {quantize}" if quantize else ""),
        )
    )
    if do_compare and quantize is None:
        info["logits_vs_unmerged"] = _compare(Path(out), plan)
    report.extra["merge"] = info
    report.findings.extend(merge_findings(plan, info))
    if quantize is not None:
        _add_quantize(report, plan, quantized, quantize, base_weights)
    report.checks = sorted({f.check for f in report.findings})
    return report


def _write(plan, out, info, *, quantize, double_quant, compare, force, executor, progress, on_quantize):
    """OUT, plain or requantized (then the quantize step's report is returned)."""
    from qfinal.ops.executors import TaskStats

    stats = TaskStats()
    if quantize is None:
        info["files"] = write_merge(plan, out, force=force, executor=executor, progress=progress, stats=stats)
        info["worker_peak_bytes"] = stats.worker_peak_bytes
        return None
    from qfinal.ops.merge_quantize import merge_then_quantize

    def before_quantize(merged: Path) -> None:
        if compare:
            info["logits_vs_unmerged"] = _compare(merged, plan)

    quantized = merge_then_quantize(
        plan,
        out,
        method=quantize,
        double_quant=double_quant,
        force=force,
        executor=executor,
        progress=progress,
        on_quantize=on_quantize,
        before_quantize=before_quantize,
        stats=stats,
    )
    info["files"] = quantized.extra["quantize"]["files"]
    info["worker_peak_bytes"] = stats.worker_peak_bytes
    return quantized


def _compare(merged: Path, plan: MergePlan) -> dict:
    from qfinal.ops.merge_compare import logits_change

    return logits_change(Path(plan.base_source.folder), merged, plan)


def _add_quantize(report: Report, plan: MergePlan, quantized: Report | None, method: str, base_weights) -> None:
    """The quantize step's stages, key lists and findings, and the compounding warning."""
    from qfinal.ops.merge_quantize import requantize_findings

    if quantized is not None:
        report.stages.extend(quantized.stages)
        report.keys = quantized.keys
        report.findings.extend(quantized.findings)
        report.extra["quantize"] = quantized.extra["quantize"]
    report.findings.extend(requantize_findings(plan, method, base_weights))


def merge_findings(plan: MergePlan, info: dict) -> list[Finding]:
    """What the merge did, adapter by adapter; what it cost against the unmerged base."""
    from qfinal.adapters.coverage import COVERAGE
    from qfinal.adapters.merge import MERGE

    findings = []
    into = plan.dtype + " weights"
    if plan.quantization:
        into = (
            f"the dense original's weights ({info['base_weights']}), in {plan.dtype}"
            if info["base_weights"]
            else f"the {plan.quantization} weights dequantized to {plan.dtype} (as qfinal dequantize writes them)"
        )
    for adapter in plan.adapters:
        findings.append(
            Finding(
                check=MERGE,
                severity="info",
                key=adapter["name"],
                message=f"adapter '{adapter['name']}' ({adapter['kind']}) "
                f"{'would be merged' if info['dry_run'] else 'merged'} into {adapter['modules']} "
                f"module(s) of {into} by peft's own layer merge (merge_and_unload's arithmetic); "
                + (
                    "its tensors read from its file module by module"
                    if adapter["held_whole"] is None
                    else f"held whole in memory, as peft holds it ({adapter['held_whole']})"
                ),
            )
        )
        if adapter["missing"]:
            shown = ", ".join(adapter["missing"][:3])
            findings.append(
                Finding(
                    check=COVERAGE,
                    severity="warning",
                    key=adapter["name"],
                    message=f"adapter '{adapter['name']}' lacks {len(adapter['missing'])} tensor(s) peft injects "
                    f"({shown}); they were merged with peft's initialization, as peft does",
                )
            )
    change = info.get("logits_vs_unmerged")
    if change:
        findings.append(
            Finding(
                check=MERGE,
                severity="info",
                message=f"merged checkpoint{' (before requantization)' if info.get('quantize') else ''} vs the "
                "base with the adapter(s) unmerged, on the probe batch: "
                f"max|Δlogits| {change['logits_max_abs']:.4g}, KL {change['kl_divergence']:.3g}, "
                f"top-1 agreement {change['top1_agreement']:.3f}",
            )
        )
    return findings
