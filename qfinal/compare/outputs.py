"""Model outputs: THE one probe batch, logits on it, and next-token metrics (KL, top-1)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from qfinal.compare.tensors import value_stats
from qfinal.compat.bitsandbytes import cpu_repack_disabled


@dataclass
class OutputDiff:
    """Next-token outputs of candidate `a` against reference `b` on one probe batch.

    `kl_divergence` is KL(p_b || p_a) per position (natural log), averaged over all batch x sequence
    positions (decoder positions for encoder-decoders). All in float64.
    """

    logits_max_abs: float
    kl_divergence: float
    top1_agreement: float
    positions: int = 0


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def vocab_size(model) -> int | None:
    """The (text) config's vocab_size; None when the model has none."""
    cfg = _text_config(model)
    v = getattr(cfg, "vocab_size", None) if cfg is not None else None
    return int(v) if v else None


PROBE_SEED = 0
PROBE_BATCH = 2
PROBE_LEN = 16
PROBE_MAX_ID = 32000


def probe_batch(model, batch: int = PROBE_BATCH, length: int = PROBE_LEN) -> dict:
    """The fixed probe batch: a CPU `torch.Generator` seeded 0 draws `input_ids` of shape
    `batch` x `length` (default 2 x 16; fewer positions if the model's max positions is smaller)
    uniformly in [0, min(vocab, 32000)); encoder-decoders also get `decoder_input_ids`, the next
    draw of the same shape from the same generator. No attention mask (all positions attend).
    Same model config and size -> same tensors, on any machine."""
    vocab = vocab_size(model) or PROBE_MAX_ID
    high = max(1, min(vocab, PROBE_MAX_ID))
    cfg = _text_config(model)
    for attr in ("max_position_embeddings", "n_positions"):
        m = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(m, int) and m > 0:
            length = min(length, m)
    g = torch.Generator().manual_seed(PROBE_SEED)
    out = {"input_ids": torch.randint(0, high, (batch, length), generator=g)}
    if _is_encoder_decoder(model):
        out["decoder_input_ids"] = torch.randint(0, high, (batch, length), generator=g)
    return out


def probe_description() -> dict:
    """`probe_batch` in words, for reports."""
    return {
        "generator": "torch.Generator (CPU)",
        "seed": PROBE_SEED,
        "batch": PROBE_BATCH,
        "max_length": PROBE_LEN,
        "token_ids": f"uniform in [0, min(vocab, {PROBE_MAX_ID}))",
        "attention_mask": None,
    }


def accepts(model, probe: Mapping) -> bool:
    """Does `model.forward` take every key of `probe` (or **kwargs)?"""
    import inspect

    fwd = getattr(model, "forward", None)
    if fwd is None:
        return False
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(k in params for k in probe)


def _device_of(model) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def probe_logits(model, probe: Mapping) -> torch.Tensor:
    """Logits of `model` on `probe`, float64 on CPU, shape (batch, positions, vocab). Runs in eval
    mode under `cpu_repack_disabled`, so the model's weights are not modified."""
    dev = _device_of(model)
    inputs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in probe.items()}
    was_training = model.training
    model.eval()
    try:
        with cpu_repack_disabled(model):
            out = model(**inputs)
    finally:
        if was_training:
            model.train()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().to("cpu", torch.float64)


def output_metrics(logits_a: torch.Tensor, logits_b: torch.Tensor) -> OutputDiff:
    """Metrics of candidate logits `a` against reference `b` (both (..., vocab)), float64."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    la = logits_a.to(torch.float64).reshape(-1, logits_a.shape[-1])
    lb = logits_b.to(torch.float64).reshape(-1, logits_b.shape[-1])
    max_abs, _ = value_stats(la, lb)
    lpa, lpb = torch.log_softmax(la, dim=-1), torch.log_softmax(lb, dim=-1)
    pb = lpb.exp()
    terms = torch.where(pb > 0, pb * (lpb - lpa), torch.zeros_like(pb))
    kl = terms.sum(dim=-1)  # per position
    top1 = (la.argmax(dim=-1) == lb.argmax(dim=-1)).to(torch.float64)
    n = la.shape[0]
    return OutputDiff(
        logits_max_abs=max_abs,
        kl_divergence=float(kl.mean()) if n else 0.0,
        top1_agreement=float(top1.mean()) if n else 1.0,
        positions=n,
    )


def output_diff(model_a, model_b, probe) -> OutputDiff:
    """Forward both models on `probe` and compare next-token outputs (`b` = reference)."""
    return output_metrics(probe_logits(model_a, probe), probe_logits(model_b, probe))


__all__ = [
    "OutputDiff",
    "PROBE_SEED",
    "PROBE_BATCH",
    "PROBE_LEN",
    "PROBE_MAX_ID",
    "vocab_size",
    "probe_batch",
    "probe_description",
    "accepts",
    "probe_logits",
    "output_metrics",
    "output_diff",
]
