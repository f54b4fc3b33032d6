"""`qfinal save`: write the finalized model, reload it twice, and prove the round trip exact.

The saved folder is what a team ships, so it is published (renamed into place) only after both
reloads — through qfinal and through plain `from_pretrained` — match the model in memory: keys,
every tensor bit for bit (bnb packed data and quant state included), ties, config, and logits.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from qfinal.adapters.peft_model import base_model_of, is_peft_model
from qfinal.checkpoint.atomic import atomic_dir, check_output_dir, sync_early
from qfinal.checkpoint.hub import TOKENIZER_FILES
from qfinal.checkpoint.writer import save_file_mapped, write_state_dict
from qfinal.compat import transformers as _hf
from qfinal.config import RunConfig, resolve_config
from qfinal.ops.load import Finalized, load
from qfinal.report import Finding, Report
from qfinal.sizes import parse_size

# Files beside the weights that a checkpoint folder carries along (tokenizer, chat template, ...):
# the tokenizer files the hub download fetches for `save`, and the generation config.
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
CONFIG_IGNORED = {"_name_or_path", "name_or_path", "transformers_version"}
ADAPTERS_DIR = "adapters"
# The round trip's logits check: one sequence of 4 positions (`compare.probe_batch` of that size).
# It is there for state the tensor comparison cannot see (a recomputed buffer such as RoPE's
# inv_freq, a config field read at init), which shows at every position past the first. A CPU
# forward costs in proportion to its tokens: on a 2-core CPU without native bf16 (AVX2 only), one
# 1.1B forward of diff's 2 x 16 probe takes 4-6 s, of these 4 tokens 0.6 s (bench/README.md).
ROUND_TRIP_PROBE = {"batch": 1, "length": 4}
SAVE_STEPS = ("finalize", "write", "reload with transformers and compare", "reload with qfinal and compare")


class RoundTripFailed(Exception):
    """Raised inside the atomic block so that a folder that failed its proof is never published."""


def copy_tokenizer_files(source: Path, dest: Path, confine_to: Path | None = None) -> list[str]:
    """A symlink is followed only inside `confine_to` (a hub snapshot's files link into its blobs)."""
    copied = []
    root = (confine_to or source).resolve()
    for name in SIDE_FILES:
        path = source / name
        linked_inside = not path.is_symlink() or path.resolve().is_relative_to(root)
        if path.is_file() and linked_inside and not (dest / name).exists():
            shutil.copyfile(path, dest / name)
            copied.append(name)
    return copied


def needs_own_writer(result: Finalized) -> bool:
    """transformers 5.x cannot save a model its bnb deserializer (or dequantize) produced."""
    ctx = result.context
    pre_quantized = ctx.hf_quantizer is not None and ctx.hf_quantizer.pre_quantized
    return pre_quantized or ctx.config.dequantize or is_peft_model(result.model)


def base_state_dict(peft_model) -> dict:
    """The base model's own tensors under a PEFT wrapper: a LoRA layer keeps the original module
    as `base_layer`, a modules_to_save wrapper as `original_module`; adapter tensors are dropped."""
    import torch

    out = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        parts = key.split(".")
        if not isinstance(value, torch.Tensor) or any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        out[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = value
    return out


def overlaps_write(result: Finalized) -> bool:
    """Whether the original's probe forward may run while `write_model` reads the weights: a plain
    model on the CPU, written by save_pretrained (no bnb layer, hook or adapter to change state)."""
    ctx = result.context
    return (
        not needs_own_writer(result)
        and ctx.hf_quantizer is None
        and ctx.config.device_map == "cpu"
        and not ctx.config.adapters
    )


def write_model(result: Finalized, folder: Path, max_bytes: int) -> str:
    model = result.model
    if not needs_own_writer(result):
        _hf.save_pretrained(model, folder, max_bytes, save_file_mapped)
        return "save_pretrained"
    import torch

    writer = "qfinal writer (save_pretrained cannot reverse bnb deserialization)"
    base = model
    if is_peft_model(model):
        base = model.get_base_model()
        state = base_state_dict(model)
        model.save_pretrained(folder / ADAPTERS_DIR)
        writer = "qfinal writer (base) + peft save_pretrained (adapters/)"
    else:
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    write_state_dict(_hf.remove_tied_weights(state, base), folder, max_bytes)
    base.config.save_pretrained(folder)
    if base.can_generate() and getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    return writer


def saved_adapters(model, folder: Path) -> list[tuple[str, Path]]:
    """(name, folder) of each unmerged adapter as peft wrote it: `default` at the root, others
    in a subfolder named after the adapter; the active one first."""
    if not is_peft_model(model):
        return []
    names = list(model.peft_config)
    active = model.active_adapter if isinstance(model.active_adapter, str) else names[0]
    names.sort(key=lambda n: n != active)
    root = folder / ADAPTERS_DIR
    return [(n, root if n == "default" else root / n) for n in names]


def config_differences(a, b) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    fields = sorted((set(da) | set(db)) - CONFIG_IGNORED)
    return [f for f in fields if da.get(f) != db.get(f)]


def round_trip_findings(
    original, reloaded, who: str, reference: dict | None = None, proven: dict[str, tuple] | None = None
):
    """(findings, comparison) of `reloaded` against `original`. `reference`: the original's probe
    batch and logits (`original_logits`), shared by both reloads; `proven`: file locations already
    proven equal to the original (`proven_locations`)."""
    from qfinal.compare.models import compare_models
    from qfinal.compare.outputs import probe_batch, vocab_size
    from qfinal.pipeline.stages.tie_weights import audit_ties

    findings = []
    if reference is None or vocab_size(reloaded) != vocab_size(original):
        # no shared logits (or a vocabulary that changed): a probe that both models can embed
        smaller = min((original, reloaded), key=lambda m: vocab_size(m) or float("inf"))
        reference = {"probe": probe_batch(smaller, **ROUND_TRIP_PROBE)}
    comparison = compare_models(
        reloaded,
        original,
        dequantize=False,
        probe=reference.get("probe"),
        reference_logits=reference.get("logits"),
        same_file_bytes=proven,
    )
    for f in comparison.findings("roundtrip"):
        findings.append(f.model_copy(update={"message": f"{who} reload: {f.message}"}))
    before = [t.model_dump() for t in audit_ties(original)]
    after = [t.model_dump() for t in audit_ties(reloaded)]
    if before == after:
        findings.append(
            Finding(
                check="roundtrip_ties",
                severity="info",
                message=f"{who} reload: {len(after)} tie(s), same pairs, same sharing",
            )
        )
    else:
        findings.append(
            Finding(
                check="roundtrip_ties", severity="error", message=f"{who} reload: ties before {before} != after {after}"
            )
        )
    differing = config_differences(reloaded.config, original.config)
    if differing:
        findings.append(
            Finding(
                check="roundtrip_config",
                severity="error",
                key=", ".join(differing),
                message=f"{who} reload: config fields differ: {', '.join(differing)}",
            )
        )
    else:
        findings.append(
            Finding(
                check="roundtrip_config",
                severity="info",
                message=f"{who} reload: config equal (quantization_config and dtype included)",
            )
        )
    return findings, comparison


def proven_locations(reloaded, comparison) -> dict[str, tuple]:
    """Where in the saved files lie the tensors of `reloaded` that `comparison` proved
    bit-identical to the original: a second reload that maps the same bytes needs no second read
    of them (on the 1.1B bench, one 2.2 GB comparison, about 0.3 s)."""
    from qfinal.checkpoint.residency import FileViews
    from qfinal.compare.views import raw_state_dict

    identical = {t.name for t in comparison.tensors if t.bit_identical and t.aligned is None}
    state = raw_state_dict(reloaded)
    out = {}
    with FileViews() as views:
        for name in identical & set(state):
            location = views.locate(state[name])
            if location is not None:
                out[name] = location
    return out


def reload_config(cfg: RunConfig, adapters: list[tuple[str, Path]]) -> RunConfig:
    """What the saved folder needs: no quantize-on-load, no dequantize; merged adapters are in the
    weights, unmerged ones come from the adapter folders written beside the base."""
    data = cfg.model_dump(by_alias=True)
    data.update(
        quantize={"method": "none"},
        dequantize=False,
        stop_after=None,
        adapters=[{"path": str(path), "name": name} for name, path in adapters],
    )
    # The reload is proven bit-identical to a model whose NaN scan already ran: skip a second scan.
    data["validate"] = {**data["validate"], "check_nan": False}
    return RunConfig.model_validate(data)


def reload_with_transformers(original, folder: Path, adapters: list[tuple[str, Path]]):
    base_class = type(base_model_of(original))
    model = base_class.from_pretrained(folder)
    if not adapters:
        return model
    from peft import PeftModel

    (first, path), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(model, path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.set_adapter(first)
    return model.eval()


def original_logits(original) -> dict | None:
    """The original's logits on the round-trip probe, computed once for both reloads; None when its
    forward does not take the probe."""
    from qfinal.compare.outputs import accepts, probe_batch, probe_logits

    probe = probe_batch(original, **ROUND_TRIP_PROBE)
    if not accepts(original, probe):
        return None
    return {"probe": probe, "logits": probe_logits(original, probe)}


def prove_round_trip(
    result: Finalized, folder: Path, reference: dict | None = None, on_step: Callable[[str], None] | None = None
) -> list[Finding]:
    """Both reloads against the original; the transformers one first, so that the qfinal reload's
    tensors that map the very bytes it was proven on are not read again. One reload at a time.
    `reference`: `original_logits(result.model)`, computed here when not given."""
    step = on_step or (lambda name: None)
    original = result.model
    adapters = saved_adapters(original, folder)
    if reference is None:
        reference = original_logits(original)
    proven: dict[str, tuple] = {}
    step("reload with transformers and compare")
    try:
        via_transformers = reload_with_transformers(original, folder, adapters)
    except Exception as err:  # the saved folder does not load with plain from_pretrained: not exact
        reason = " ".join(str(err).split())
        transformers_findings = [
            Finding(
                check="roundtrip_saved",
                severity="error",
                message=(f"transformers reload: from_pretrained failed: {type(err).__name__}: {reason}"),
            )
        ]
    else:
        transformers_findings, comparison = round_trip_findings(
            original, via_transformers, "transformers", reference, None
        )
        proven = proven_locations(via_transformers, comparison)
        del via_transformers, comparison
    step("reload with qfinal and compare")
    via_qfinal = load(folder, reload_config(result.context.config, adapters), command="save (reload)")
    findings = [
        f.model_copy(update={"message": f"qfinal reload: {f.message}"})
        for f in via_qfinal.report.findings
        if f.severity != "info"
    ]
    findings += round_trip_findings(original, via_qfinal.model, "qfinal", reference, proven)[0]
    return findings + transformers_findings


def save(
    source: str | Path,
    out: str | Path,
    config: RunConfig | str | Path | None = None,
    *,
    max_shard_size: int | str = "2GB",
    force: bool = False,
    allow_pickle: bool = False,
    on_step: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Report:
    """Finalize `source`, save to `out`, and prove the saved folder reloads to the same model.
    `on_step(name)` is called as each of SAVE_STEPS starts."""
    step = on_step or (lambda name: None)
    out = Path(out)
    cfg = resolve_config(config, overrides)
    check_output_dir(out, force)
    max_bytes = parse_size(max_shard_size)
    step(SAVE_STEPS[0])
    result = load(source, cfg, allow_pickle=allow_pickle, command="save", tokenizer=True)  # side files too
    report = result.report
    if not report.ok:
        report.findings.append(
            Finding(
                check="roundtrip_saved",
                severity="error",
                key=str(out),
                message="not saved: the finalized model has error findings",
            )
        )
        return report
    try:
        with atomic_dir(out, force=force) as tmp, ThreadPoolExecutor(1, "qfinal-probe") as pool:
            # A plain model's probe forward only reads its weights, and so does save_pretrained: it
            # runs while they are written (on the 1.1B bench, a 0.3 s forward hidden behind a 0.6 s
            # write). bnb modules, offload hooks and adapters change state in forward: not those.
            reference = pool.submit(original_logits, result.model) if overlaps_write(result) else None
            step(SAVE_STEPS[1])
            writer = write_model(result, tmp, max_bytes)
            copied = copy_tokenizer_files(result.context.source.folder, tmp, result.context.source.confine_to)
            sync_early(tmp, tmp)  # flushed while the round trip is proven
            findings = prove_round_trip(result, tmp, reference.result() if reference else None, step)
            report.findings.extend(findings)
            report.extra["save"] = {
                "out": str(out),
                "writer": writer,
                "copied": copied,
                "files": sorted(p.name for p in tmp.iterdir()),
            }
            if not report.ok:
                raise RoundTripFailed
    except RoundTripFailed:
        report.findings.append(
            Finding(
                check="roundtrip_saved",
                severity="error",
                key=str(out),
                message="round trip not exact: the output folder was not published",
            )
        )
        return report
    report.findings.append(
        Finding(check="roundtrip_saved", severity="info", key=str(out), message=f"saved with {writer} and proven")
    )
    return report
