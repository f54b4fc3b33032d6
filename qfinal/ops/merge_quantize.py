"""`qfinal merge --quantize nf4|fp4|int8`: the merged checkpoint requantized with bitsandbytes.

peft's answer is `merge_and_unload()` then `save_pretrained`, and transformers quantizes that
plain checkpoint on load; qfinal does the same two steps streamed: the merge is written to a
plain checkpoint in a temporary folder beside OUT (same filesystem), and `qfinal quantize`'s
code streams that into OUT. So OUT is byte for byte what `qfinal quantize` writes from the plain
merge. OUT is published only by the quantize step's `atomic_dir`; the temporary merge is removed
whatever happens, on an interrupt too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qfinal.checkpoint.atomic import check_output_dir, scratch_dir
from qfinal.errors import ConfigError
from qfinal.report import Finding, Report


def check_quantize(method: str | None, double_quant: bool) -> None:
    """Refuse a bad --quantize / --double-quant before any work."""
    if method is None:
        if double_quant:
            raise ConfigError("--double-quant applies with --quantize nf4|fp4", where="--double-quant")
        return
    from qfinal.ops.quantize import check_options

    check_options(method, double_quant)


def merge_then_quantize(
    plan,
    out: Path,
    *,
    method: str,
    double_quant: bool,
    force: bool,
    executor=None,
    progress: Callable[[int, int], None] | None = None,
    on_quantize: Callable[[], None] | None = None,
    before_quantize: Callable[[Path], None] | None = None,
    stats=None,
) -> Report:
    """Merge `plan` into a temporary plain checkpoint, then quantize that into `out`; returns the
    quantize run's report. `before_quantize(merged)` sees the plain merge (the logits comparison)."""
    from qfinal.ops.merge import write_merge
    from qfinal.ops.quantize import run_quantize

    out = Path(out)
    check_output_dir(out, force)
    with scratch_dir(f".{out.name}.qfinal-merge-", out.resolve().parent) as area:
        merged = area / "merged"
        write_merge(plan, merged, executor=executor, progress=progress, stats=stats)
        if before_quantize is not None:
            before_quantize(merged)
        if on_quantize is not None:
            on_quantize()
        return run_quantize(
            merged, out, method=method, double_quant=double_quant, force=force, progress=progress, executor=executor
        )


def plan_requantized(plan, out: Path, *, method: str, double_quant: bool, force: bool) -> Report:
    """The quantize step of a dry run: `qfinal quantize --dry-run` of the merge's outline (its
    headers over holes, in a temporary folder, removed after): what OUT would hold and the memory
    it needs, with nothing merged. Double quantization's offsets (each weight's absmax mean, in
    the quant-state JSON) are not read from the holes but taken as 0.0: sizes may be off by a few
    bytes a weight."""
    from qfinal.ops.merge import write_merge
    from qfinal.ops.quantize import run_quantize

    with scratch_dir("qfinal-merge-outline-") as area:
        outline = area / "merged"
        write_merge(plan, outline, outline=True)
        return run_quantize(
            outline, out, method=method, double_quant=double_quant, force=force, dry_run=True, outline=True
        )


def requantize_findings(plan, method: str, base_weights) -> list[Finding]:
    """A bnb base merged then requantized: its 4-bit rounding and the new one add up (not so for a
    merge into `--base-weights`, the dense original)."""
    if not plan.quantization or base_weights:
        return []
    return [
        Finding(
            check="quantization_config",
            severity="warning",
            message=f"requantizing a merge into a {plan.quantization} base (dequantized to {plan.dtype}) to "
            f"{method}: the two rounding errors compound; merge into the original dense weights "
            "(--base-weights DENSE_DIR) where you have them",
        )
    ]
