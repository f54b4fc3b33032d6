"""`qfinal plan` / `load --dry-run`: what a load will do and cost, reading no tensor data.

Runs meta_init and quantizer_preprocess, then infers the device map exactly as the real load
would (same transformers/accelerate call, same max_memory), and sums the bytes each device will
hold. accelerate's own estimate needs the hub and knows nothing of quantization; this one uses
the skeleton qfinal will really fill.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from qfinal.checkpoint.sources import hub_request, resolve_source, stamp_report
from qfinal.compat import transformers as _hf
from qfinal.config import RunConfig, resolve_config
from qfinal.pipeline.context import Context
from qfinal.pipeline.runner import run_pipeline
from qfinal.report import Finding, Report

LARGE_LEAF_SHARE = 0.05  # an unquantized module above this share of the model is called out


def device_of(name: str, device_map: dict | None) -> str:
    if not device_map:
        return "cpu"
    best, best_len = device_map.get("", "cpu"), -1
    for prefix, device in device_map.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = device, len(prefix)
    return str(best)


def _bnb_4bit_bytes(numel: int, qc) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight: packed data plus quant state."""
    blocksize = 64
    blocks = -(-numel // blocksize)
    packed = -(-numel // 2)
    if getattr(qc, "bnb_4bit_use_double_quant", False):
        nested_blocks = -(-blocks // 256)
        return packed + blocks + nested_blocks * 4 + 256 * 4 + 16 * 4
    return packed + blocks * 4 + 16 * 4


def expected_bytes(model, hf_quantizer, converted: set[str], inventory=None) -> dict[str, int]:
    """Bytes per parameter/buffer name once loaded (ties counted once). A weight some format
    loads as its stored components (torchao) counts those, from `inventory`'s headers."""
    from qfinal.formats import planned_sizes

    out: dict[str, int] = {}
    qc = getattr(hf_quantizer, "quantization_config", None)
    persistent = set(model.state_dict(keep_vars=True))
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})  # not tied yet on the skeleton
    planned = planned_sizes(inventory)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in persistent or name in tied_targets:
            continue
        module = name.rpartition(".")[0]
        numel = tensor.numel()
        stored = planned.get(name)
        if stored is not None:
            out[name] = stored
        elif module in converted and name.endswith(".weight"):
            if getattr(qc, "load_in_8bit", False):
                rows = tensor.shape[0] if tensor.dim() else 1
                out[name] = numel + rows * 4
            else:
                out[name] = _bnb_4bit_bytes(numel, qc)
        else:
            out[name] = numel * tensor.element_size()
    return out


def plan(source: str | Path, config: RunConfig | str | Path | None = None, **overrides: Any) -> Report:
    cfg = resolve_config(config, overrides)
    src = resolve_source(source, hub_request(cfg, headers_only=True))  # a hub id: config and headers only
    report = Report(source=src.label, command="plan")
    stamp_report(report, src)
    ctx = Context(source=src, config=cfg, report=report)
    from qfinal.pipeline.runner import default_stages

    stages = [s for s in default_stages() if s.name in ("meta_init", "quantizer_preprocess")]
    run_pipeline(ctx, stages)
    fill_plan(ctx)
    return report


def fill_plan(ctx: Context) -> None:
    model, cfg = ctx.model, ctx.config
    device_map = ctx.device_map
    if device_map is not None:
        device_map = _hf.get_device_map(model, device_map, cfg.max_memory, ctx.hf_quantizer)
    report = ctx.report
    report.placement = {k: str(v) for k, v in (device_map or {"": "cpu"}).items()}
    converted = {c.module for c in report.keys.converted}
    sizes = expected_bytes(model, ctx.hf_quantizer, converted, ctx.inventory)
    per_device: dict[str, int] = defaultdict(int)
    for name, nbytes in sizes.items():
        per_device[device_of(name, device_map)] += nbytes
    total = sum(sizes.values()) or 1
    per_module: dict[str, int] = defaultdict(int)
    for name, nbytes in sizes.items():
        per_module[name.rpartition(".")[0]] += nbytes
    large = [
        {"module": m, "bytes": b, "share": round(b / total, 4)}
        for m, b in sorted(per_module.items())
        if m not in converted and b / total >= LARGE_LEAF_SHARE
    ]
    report.extra["plan"] = {
        "bytes_per_device": dict(sorted(per_device.items())),
        "total_bytes": sum(sizes.values()),
        "large_unquantized": large,
        "layers": _by_layer(report.placement),
    }
    for leaf in large:
        report.findings.append(
            Finding(
                check="plan",
                severity="info",
                key=leaf["module"],
                message=f"unquantized, {leaf['bytes']:,} bytes ({leaf['share']:.0%} of the model)",
            )
        )


def _by_layer(placement: dict[str, str]) -> list[dict]:
    rows = []
    for module, device in placement.items():
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
        rows.append(
            {"module": module or "(whole model)", "layer": int(match.group(1)) if match else None, "device": device}
        )
    return rows


def measured_bytes_per_device(model, disk_offload_index: dict | None) -> dict[str, int]:
    """After a real load: bytes held by each device; disk from accelerate's offload index
    (for a safetensors checkpoint it points into the checkpoint files instead of copying)."""
    import torch

    from qfinal.formats import held_bytes

    out: dict[str, int] = defaultdict(int)
    seen = set()
    persistent = set(model.state_dict(keep_vars=True))
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in persistent or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.device.type != "meta":
            out[str(tensor.device.type)] += held_bytes(tensor)
    for name, entry in (disk_offload_index or {}).items():
        numel = model.get_parameter_or_buffer(name).numel()  # the meta placeholder keeps the shape
        out["disk"] += numel * getattr(torch, entry["dtype"]).itemsize
    return dict(sorted(out.items()))
