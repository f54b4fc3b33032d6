"""The built-in `demo` checkpoint: a small deterministic Llama with tied embeddings in two shards.

Written once into the user cache, so `qfinal load demo` shows the whole pipeline with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_VERSION = "v1"
DEMO_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def cache_root() -> Path:
    env = os.environ.get("QFINAL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qfinal"


def ensure_demo_checkpoint() -> Path:
    folder = cache_root() / f"demo-llama-{DEMO_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_demo_checkpoint(folder)
    return folder


def write_demo_checkpoint(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qfinal.checkpoint.atomic import atomic_dir

    # fork_rng: seeding for the demo's weights must not reset the caller's global generator
    with atomic_dir(out, force=True) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(**DEMO_CONFIG, dtype="float32")
        model = LlamaForCausalLM(config).eval()
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values() if p is not model.lm_head.weight)
        model.save_pretrained(tmp, max_shard_size=int(total * 0.6))
    return out
