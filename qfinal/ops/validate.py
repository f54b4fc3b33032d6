"""`qfinal validate`: the CI gate. Full mode runs the pipeline; fast mode reads only headers.

Checkpoint-level defects (bad headers, index disagreements, escaping shard paths) are the
gate's findings here, exit 1, where every other command refuses them with exit 2. Exit 2 stays
for what makes validation itself impossible: a missing path, an unreadable config.json, a bad
YAML config or option.

Fast mode builds the model on the meta device (no tensor memory) and compares it with the
safetensors headers and the index, key by key, with transformers' own key renaming; it never
opens a tensor's data, so a 70B checkpoint takes seconds and a few hundred MB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from qfinal.checkpoint.sources import Source, hub_request, read_config_json, resolve_source, stamp_report
from qfinal.checks.keys import compile_patterns, dtype_findings, inventory_findings, key_findings
from qfinal.checks.names import CHECKS, FAST_MODE_CHECKS, HEADER_CHECKS, KEY_CHECKS
from qfinal.checks.quant import prequantized_modules, quantization_findings
from qfinal.checks.ties import declared_ties, tie_findings
from qfinal.config import RunConfig, resolve_config
from qfinal.formats import is_quant_state_key
from qfinal.pipeline.context import Context, peak_rss_bytes
from qfinal.pipeline.dequantize_on_load import dense_inventory
from qfinal.pipeline.runner import run_pipeline
from qfinal.report import Finding, MismatchedKey, Report, StageRecord

FAST_STAGES = ("meta_init", "quantizer_preprocess")
FAST_SKIPS = {
    "nan_inf": "fast mode never reads tensor data",
    "meta_tensors": "fast mode only builds the model on the meta device",
}


def validate(
    source: str | Path | Source,
    config: RunConfig | str | Path | None = None,
    *,
    fast: bool = False,
    allow_pickle: bool = False,
    on_stage: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Report:
    """Validate `source`; the report's findings decide the exit code (`report.failing(level)`).

    Raises QfinalError (exit 2) only when validation cannot run: a missing path, an unreadable
    config.json, a bad config or allow-list pattern.
    """
    cfg, ignored = _gate_config(config, overrides)
    # a hub id: with fast, config.json and the safetensors headers only (a Source stays as it is)
    src = resolve_source(source, hub_request(cfg, allow_pickle=allow_pickle, headers_only=fast))
    raw = read_config_json(src.folder)  # no or broken config.json: exit 2 before any work

    def fresh() -> Context:
        report = Report(source=src.label, command="validate --fast" if fast else "validate")
        stamp_report(report, src)
        if ignored:
            report.extra["ignored_by_validate"] = ignored
        ctx = Context(source=src, config=cfg, report=report, allow_pickle=allow_pickle, parsed_config_json=raw)
        ctx.tolerate_checkpoint_problems = True
        ctx.validate_command = True
        return ctx

    ctx = fresh()
    skipped = dict(FAST_SKIPS)
    full = _FullMode()  # fast mode: no full-mode outcome to report
    if not fast:
        full = _try_full_mode(ctx, src, cfg, allow_pickle, on_stage)
        if full.done:
            return ctx.report
        ctx = fresh()
        ctx.report.extra["full_mode"] = f"not possible: {full.why}; header-only checks were run instead"
        skipped = {c: f"the model was not loaded: {full.why}" for c in FAST_SKIPS}
    if cfg.adapters:
        skipped["adapter_coverage"] = "adapters are applied in the full mode only"
    _run_fast(ctx, on_stage, skipped)
    refused = full.refused
    if refused is not None and not any(
        f.check == refused.check and f.severity == "error" for f in ctx.report.findings
    ):  # unless fast mode said it itself
        ctx.report.findings.insert(0, refused)
    if full.loader_error is not None and not ctx.report.failing("error"):
        raise full.loader_error  # the checkpoint looks fine, so the crash is a bug: keep its traceback
    return ctx.report


def _gate_config(config, overrides: dict) -> tuple[RunConfig, list[str]]:
    """The config the gate runs with (always to the end) and the settings it overrides, named; a bad
    allow-list pattern is a ConfigError before any work."""
    cfg = resolve_config(config, overrides)
    vcfg = cfg.validate_
    compile_patterns(vcfg.allow_missing, "validate.allow_missing")
    compile_patterns(vcfg.allow_unexpected, "validate.allow_unexpected")
    ignored = []
    if cfg.stop_after is not None:  # the gate always runs to the end
        ignored.append(f"stop_after: {cfg.stop_after}")
        cfg = cfg.model_copy(update={"stop_after": None})
    if not vcfg.enabled:
        ignored.append("validate.enabled: false")
    return cfg, ignored


@dataclass
class _FullMode:
    """How the full mode went: `done` (its report stands), or why the header-only checks run instead."""

    done: bool = False
    why: str = "the checkpoint files are broken"
    refused: Finding | None = None  # a checkpoint refusal met while loading, reported by the gate
    loader_error: Exception | None = None  # a crash, re-raised unless the headers explain it


def _try_full_mode(ctx: Context, src: Source, cfg: RunConfig, allow_pickle: bool, on_stage) -> _FullMode:
    """Run the whole pipeline into `ctx` when the checkpoint files allow it."""
    from qfinal.checkpoint.inventory import inspect_checkpoint
    from qfinal.errors import QfinalError

    inventory = inspect_checkpoint(src.folder, allow_pickle=allow_pickle, confine_to=src.confine_to)
    full = _FullMode()
    if inventory.problems and not (loadable_despite_problems(inventory) and not cfg.offload_folder):
        return full
    try:
        run_pipeline(ctx, on_stage=on_stage)  # the Validate stage reports any problems too
        full.done = True
    except QfinalError as err:
        # a checkpoint refusal met while loading (a bad pickle, inconsistent quant state):
        # the header-only checks can still run and report it
        check = getattr(err, "check", None)
        if check not in HEADER_CHECKS + KEY_CHECKS:
            raise
        full.refused = Finding(check=check, severity="error", key=getattr(err, "key", None), message=err.line())
        full.why = f"{check}: {err.what}"
    except Exception as err:  # noqa: BLE001 - kept only if the headers explain it, else re-raised
        full.loader_error = err
        full.why = f"the loader failed on this checkpoint ({type(err).__name__}: {_error_line(err)})"
    return full


def _error_line(err: BaseException) -> str:
    """The first line of an exception message, printable."""
    from qfinal.checkpoint.headers import escape_key

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    return escape_key(lines[0])


def loadable_despite_problems(inventory) -> bool:
    """True when every problem is a key-level disagreement between the index and shards that were all
    read (a key listed under the wrong shard, in two shards, or not listed): the loader reads every
    key of every shard file, so the full mode can still run and see data. Missing or unreadable
    files, bad headers, escaping paths and pickle refusals stop it (disk offload, which trusts the
    index's weight_map, is kept out by the caller)."""
    readable = {e.file for e in inventory.tensors.values()}
    return bool(readable) and all(
        p.check == "index_consistency" and p.key is not None and p.file in readable for p in inventory.problems
    )


def _run_fast(ctx: Context, on_stage, skipped: dict[str, str]) -> None:
    from qfinal.pipeline.runner import default_stages

    run_pipeline(ctx, [s for s in default_stages() if s.name in FAST_STAGES], on_stage=on_stage)
    if on_stage:
        on_stage("validate")
    start = time.perf_counter()
    findings, not_run = fast_findings(ctx)
    skipped = {**not_run, **skipped}
    ctx.report.findings.extend(findings)
    ctx.report.checks = [c for c in FAST_MODE_CHECKS if c not in skipped]
    ctx.report.extra["skipped_checks"] = {c: skipped[c] for c in CHECKS if c in skipped}
    errors = sum(f.severity == "error" for f in ctx.report.findings)
    warnings = sum(f.severity == "warning" for f in ctx.report.findings)
    ctx.report.stages.append(
        StageRecord(
            name="validate",
            seconds=round(time.perf_counter() - start, 6),
            peak_rss_bytes=peak_rss_bytes(),
            detail=f"header-only checks: {errors} error(s), {warnings} warning(s)",
        )
    )


# ----------------------------------------------------------------------------- key matching


@dataclass
class KeyMatch:
    """The checkpoint's keys matched against the model's, as transformers' loader would match them."""

    expected: dict[str, tuple[int, ...]]  # model key -> shape on meta
    ckpt_of: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key (direct loads)
    converted: set[str] = field(default_factory=set)  # model keys filled by a weight converter
    missing: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)  # checkpoint keys
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # model key -> shard that could not be read

    def present(self, model_key: str) -> str | None:
        return self.ckpt_of.get(model_key)


def _renamer(model, hf_quantizer, expected: dict) -> Callable[[str], tuple[str, Any]]:
    """checkpoint key -> (model key, converter or None), exactly as `convert_and_load_state_dict_in_model`
    renames: legacy renamings, at most one converter (bnb quant state, fused weights), then the
    base-model prefix added or stripped.

    Private transformers API (`core_model_loading.rename_source_key`), pinned like the rest of _hf.py.
    """
    from qfinal.compat import transformers as _hf
    from qfinal.compat.transformers import WeightConverter, WeightRenaming, rename_source_key

    mapping = _hf.weight_conversions(model, hf_quantizer) or []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix

    def rename(key: str):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        converter = by_pattern.get(pattern) if pattern is not None else None
        # A converter whose matched source is its own single target (bnb's `weight` -> `weight`) renames nothing.
        if converter is not None and len(converter.target_patterns) == 1 and pattern == converter.target_patterns[0]:
            converter = None
        return renamed, converter

    return rename


def match_keys(model, hf_quantizer, inventory, quantized_weights: set[str]) -> KeyMatch:
    """What `from_pretrained` would report as missing / unexpected / mismatched, from headers only."""
    from qfinal.compat import transformers as _hf

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    match = KeyMatch(expected=expected)
    rename = _renamer(model, hf_quantizer, expected)
    tensors = inventory.tensors
    for key in sorted(tensors):
        renamed, converter = rename(key)
        if renamed in expected:
            if is_quant_state_key(key):
                continue  # folded into its weight by the bnb converter; quantization_config checks it
            if converter is not None:
                first = converter.target_patterns[0]
                match.converted.update(renamed.replace(first, t) for t in converter.target_patterns)
                continue
            if renamed in match.ckpt_of:
                match.unexpected.add(key)  # two checkpoint keys for one parameter
                continue
            match.ckpt_of[renamed] = key
            shape = tuple(tensors[key].shape)
            if renamed not in quantized_weights and shape != expected[renamed]:
                match.mismatched.append((renamed, shape, expected[renamed]))
        else:
            match.unexpected.add(key)
    missing = {k for k in expected if k not in match.ckpt_of and k not in match.converted and not is_quant_state_key(k)}

    # Tying, as transformers' tie_weights does it while loading: one present half fills the other.
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for target, source in ties.items():
        if target in missing and source not in missing:
            missing.discard(target)
        elif source in missing and target not in missing:
            missing.discard(source)
        elif target in missing and source in missing:
            if any(s == source and t not in missing for t, s in ties.items()):
                missing.discard(target)
                missing.discard(source)
    info = SimpleNamespace(missing_keys=missing, unexpected_keys=match.unexpected)
    _hf.adjust_keys(model, info)  # the model's own ignore lists (rotary inv_freq, position_ids, ...)
    match.missing, match.unexpected = set(info.missing_keys), set(info.unexpected_keys)

    # Keys the index places in a shard that could not be read are unknown, not missing.
    readable = {e.file for e in tensors.values()}
    weight_map = (inventory.index or {}).get("weight_map") or {}
    for key, shard in weight_map.items():
        if isinstance(shard, str) and shard not in readable and key not in tensors:
            renamed, _ = rename(key)
            if renamed in match.missing:
                match.unreadable[renamed] = shard
    return match


# ----------------------------------------------------------------------------- fast findings


def fast_findings(ctx: Context) -> tuple[list[Finding], dict[str, str]]:
    """Compare the meta skeleton with the safetensors headers: keys, shapes, dtypes, quant state, ties.

    Returns the findings and the checks that could not run, with why.
    """
    from qfinal.compat.transformers import keep_in_fp32_modules

    model, inventory, vcfg, report = ctx.model, ctx.inventory, ctx.config.validate_, ctx.report
    raw = ctx.config_json()
    findings = inventory_findings(inventory)
    if inventory.format != "safetensors":
        why = "fast mode reads safetensors headers only; pickle weights need the full mode"
        if inventory.files and report.command.endswith("--fast"):
            findings.append(
                Finding(
                    check="checkpoint_files", severity="warning", message=f"pickle weights: {why} (run without --fast)"
                )
            )
        return findings, dict.fromkeys(KEY_CHECKS, why)
    if not inventory.tensors:
        return findings, dict.fromkeys(KEY_CHECKS, "no safetensors header could be read")

    modules = prequantized_modules(raw, report)
    quantized_weights = {f"{c.module}.weight" for c in report.keys.converted}
    dense = dense_inventory(ctx)  # a format dequantized on load: the checkpoint it encodes
    match = match_keys(model, ctx.hf_quantizer, dense, quantized_weights)
    findings += key_findings(
        match.missing, match.unexpected, match.mismatched, vcfg.allow_missing, vcfg.allow_unexpected, match.unreadable
    )
    findings += dtype_findings(raw, inventory, keep_in_fp32_modules(model))
    findings += quantization_findings(raw, inventory, modules, match.present)
    shapes = {k: e.shape for k, e in dense.tensors.items()}
    findings += tie_findings(declared_ties(model), match.present, shapes=shapes)

    keys = report.keys
    keys.missing = sorted(match.missing)
    keys.unexpected = sorted(match.unexpected)
    keys.mismatched = [
        MismatchedKey(key=k, checkpoint_shape=list(a), model_shape=list(b)) for k, a, b in sorted(match.mismatched)
    ]
    return findings, {}
