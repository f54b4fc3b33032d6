"""`qfinal dequantize --verify`: the proof that OUT is right.

OUT is reloaded with plain transformers and compared with the format's own reference dequantization
of SOURCE (`QuantFormat.verify_reference`: transformers' `dequantize()` for bnb, the format library
where transformers has none): keys, every tensor bit for bit, dtypes, and logits on a fixed probe
batch, through the shared comparison engine (`qfinal.compare`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qfinal.checkpoint.sources import Source, read_config_json, resolve_source
from qfinal.errors import SourceError
from qfinal.ops.dequantize import dtype_name, parse_dtype
from qfinal.report import Finding


def probe_inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    ids = torch.randint(0, min(vocab, 256), (2, 8), generator=g)
    kwargs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :4]
    return kwargs


def reference_state_dict(model, layout_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`model` (already `dequantize(dtype)`'ed) as a state dict in `layout_model`'s layout and `dtype`.

    Dequantized Conv1D weights come back as nn.Linear [out, in]: transpose them where the plain
    model has a Conv1D. Tensors transformers left in the load dtype are cast to `dtype`.
    """
    from transformers.pytorch_utils import Conv1D

    conv1d = {n for n, m in layout_model.named_modules() if isinstance(m, Conv1D)}
    ref_modules = dict(model.named_modules())
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and owner in conv1d and not isinstance(ref_modules.get(owner), Conv1D):
            tensor = tensor.t()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    return state


def compare_state_dicts(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype
) -> list[Finding]:
    """Keys, bit-exact values and dtypes of OUT (`got`) against the reference (`want`), through the
    shared engine (`qfinal.compare.tensors.compare_tensors`): one error finding per offending key."""
    from qfinal.compare.tensors import compare_tensors

    diffs = compare_tensors(got, want)
    return _key_findings(diffs, len(got)) + _dtype_findings(got, dtype) + _value_findings(diffs)


def _key_findings(diffs, count: int) -> list[Finding]:
    """An error per key on one side only; one info line when the names agree."""
    missing = sorted(t.name for t in diffs if t.status == "only_b")
    extra = sorted(t.name for t in diffs if t.status == "only_a")
    findings = [
        Finding(check="dequantize_keys", severity="error", key=key, message=message)
        for keys, message in (
            (missing, "in the dequantized reference but not in OUT"),
            (extra, "in OUT but not in the dequantized reference"),
        )
        for key in keys
    ]
    if not missing and not extra:
        findings.append(
            Finding(check="dequantize_keys", severity="info", message=f"{count} tensors, same names as the reference")
        )
    return findings


def _dtype_findings(got: dict[str, torch.Tensor], dtype: torch.dtype) -> list[Finding]:
    bad_dtype = [k for k, t in got.items() if t.is_floating_point() and t.dtype != dtype]
    findings = [
        Finding(
            check="dequantize_dtype",
            severity="error",
            key=key,
            message=f"{dtype_name(got[key].dtype)}, expected {dtype_name(dtype)}",
        )
        for key in bad_dtype
    ]
    if not bad_dtype:
        findings.append(
            Finding(check="dequantize_dtype", severity="info", message=f"all floating tensors are {dtype_name(dtype)}")
        )
    return findings


def _value_findings(diffs) -> list[Finding]:
    """An error per tensor on both sides that is not bit-identical, saying how it differs."""
    from qfinal.compare.tensors import format_number

    both = sorted((t for t in diffs if t.status not in ("only_a", "only_b")), key=lambda t: t.name)
    differ = [t for t in both if not t.bit_identical]
    findings = []
    for t in differ:
        if t.status == "shape":
            detail = f"shape {list(t.shape_a)} vs reference {list(t.shape_b)}"
        elif t.status == "dtype":
            detail = f"dtype {t.dtype_a} vs reference {t.dtype_b}"
        else:
            detail = f"max abs difference {format_number(t.max_abs)}, rel error {format_number(t.rel_error)}"
        findings.append(
            Finding(
                check="dequantize_tensors",
                severity="error",
                key=t.name,
                message=f"differs from the format's reference dequantization: {detail}",
            )
        )
    if not differ:
        findings.append(
            Finding(
                check="dequantize_tensors",
                severity="info",
                message=f"{len(both)} tensors bit-identical to the format's reference dequantization",
            )
        )
    return findings


def logits_tolerance(dtype: torch.dtype) -> float:
    """Allowed max |logit difference| / max |logit| between OUT and the exact (float32) dequantization.

    Both run in float32, so only OUT's one rounding of each tensor to `dtype` separates them: each
    weight is off by at most u (unit roundoff: 2^-11 float16, 2^-8 bfloat16, 2^-24 float32). On the
    test models the logits move by about 1u; 16u leaves room for deep models and still catches a
    wrong layout or a wrong quant map, which move logits by O(1).
    """
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]
    return 16 * u


def verify_dequantized(source: Path | str | Source, out: Path, dtype: torch.dtype | str) -> list[Finding]:
    """Reload OUT with plain transformers and compare with the format's reference dequantization.

    The reference is SOURCE as `fmt.verify_reference` gives it, in float32 where the format allows
    (bnb: transformers' load, then `dequantize(torch.float32)` before any forward pass, which on
    CPUs with AVX512-BF16 repacks 4-bit weights in place), cast to `dtype`: bit-identical to
    `dequantize(dtype)`, as float32 holds the bnb result exactly. Its float32 logits are compared
    with OUT's. Pass the Source `dequantize_checkpoint` resolved: a hub id resolved again could
    name another commit of a moving branch.
    """
    from qfinal.compat.transformers_layout import architecture_class

    dtype = parse_dtype(dtype)
    resolved = resolve_source(source)
    out = Path(out)
    config = read_config_json(out)
    _name, cls = architecture_class(config)
    if cls is None:
        raise SourceError("config.json names no transformers model class", where=str(out))

    model, info = cls.from_pretrained(out, output_loading_info=True)
    model.eval()
    findings = _loading_findings(info) + _config_findings(config, dtype)
    from qfinal.formats import format_for

    fmt = format_for(read_config_json(resolved.folder))
    if fmt is None:
        raise SourceError("config.json declares no quantization format qfinal reads", where=str(resolved.folder))
    reference = fmt.verify_reference(cls, resolved.folder)
    findings += compare_state_dicts(model.state_dict(), reference_state_dict(reference, model, dtype), dtype)

    def logits(m) -> torch.Tensor:  # a bnb reference may sit on the GPU where one is present
        device = next(m.parameters()).device
        return m.float()(**{k: v.to(device) for k, v in probe_inputs(m).items()}).logits.float().cpu()

    with torch.no_grad():
        want = logits(reference)
        del reference
        got = logits(model)
    findings.append(compare_logits(got, want, dtype))
    return findings


def _loading_findings(info: dict) -> list[Finding]:
    """What plain `from_pretrained` reported while loading OUT: an error per key it complained of."""
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    findings = [
        Finding(
            check="dequantize_keys",
            severity="error",
            key=str(key),
            message=f"plain from_pretrained reports it in {kind}",
        )
        for kind, keys in problems.items()
        for key in keys
    ]
    if not problems:
        findings.append(
            Finding(
                check="dequantize_keys",
                severity="info",
                message="OUT loads with plain from_pretrained: no missing, unexpected or mismatched keys",
            )
        )
    return findings


def _config_findings(config: dict, dtype: torch.dtype) -> list[Finding]:
    """OUT's config.json must declare `dtype` and hold no quantization_config."""
    if "quantization_config" not in config and config.get("dtype") == dtype_name(dtype):
        return []
    return [
        Finding(
            check="dequantize_dtype",
            severity="error",
            key="config.json",
            message=f"config.json dtype is {config.get('dtype')!r}, expected "
            f"{dtype_name(dtype)!r}, and it must hold no quantization_config",
        )
    ]


def compare_logits(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> Finding:
    """Logits of OUT against the reference's, through the shared engine (`output_metrics`, float64)."""
    from qfinal.compare.outputs import output_metrics

    tol = logits_tolerance(dtype)
    if got.shape != want.shape:
        return Finding(
            check="dequantize_logits",
            severity="error",
            message=f"logits shape {list(got.shape)} vs reference {list(want.shape)}",
        )
    metrics = output_metrics(got, want)
    scale = want.abs().max().item() or 1.0
    diff = metrics.logits_max_abs
    ok = diff / scale <= tol
    return Finding(
        check="dequantize_logits",
        severity="info" if ok else "error",
        message=f"logits vs transformers' float32 dequantization: max abs difference "
        f"{diff:.3g} = {diff / scale:.2g} of max |logit| (tolerance {tol:.2g}); "
        f"KL {metrics.kl_divergence:.3g}, top-1 agreement {metrics.top1_agreement:.4f}",
    )
