"""The benchmark's Python-side tasks, one per child process: `python bench/tasks.py TASK ARGS...`.

The transformers tasks are what a user would write with plain transformers (+ bitsandbytes) to get
the same result as the qfinal command they are compared with. `qfinal-load-forward` exists because
the CLI has no "run a forward pass" option: it is `qfinal.load(path)` (the whole pipeline, checks
included) followed by the very same forward pass as `transformers-load-forward`.

Every task exits 0 on success and prints one line; the orchestrator (bench/run.py) measures wall
time and the child's peak RSS from the outside (os.wait4), so nothing here times itself.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROBE_TOKENS = 32


def forward(model) -> str:
    """One forward pass on a fixed batch, so every weight is really read; returns a short digest."""
    import torch

    input_ids = torch.arange(1, PROBE_TOKENS + 1).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    if not torch.isfinite(logits).all():
        raise SystemExit("forward pass produced non-finite logits")
    return f"logits {tuple(logits.shape)} {logits.dtype} sum={logits.float().sum().item():.4f}"


def bnb_config(method: str):
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method)


def transformers_load(path: str, quantize: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": "auto"}
    if quantize:
        kwargs["quantization_config"] = bnb_config(quantize)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# --------------------------------------------------------------------------- tasks


def qfinal_load_forward(path: str) -> str:
    import qfinal

    result = qfinal.load(path)
    if not result.report.ok:
        raise SystemExit("qfinal.load reported error findings")
    return forward(result.model)


def transformers_load_forward(path: str) -> str:
    return forward(transformers_load(path))


def transformers_load_quantized(path: str, method: str) -> str:
    model = transformers_load(path, method)
    return f"{type(model).__name__} quantized {method}"


def transformers_dequantize(path: str, dtype: str = "float16") -> str:
    import torch

    model = transformers_load(path)
    model.dequantize(dtype=getattr(torch, dtype))
    return f"dequantized to {dtype}"


def transformers_save_round_trip(path: str, out: str, max_shard_size: str = "2GB") -> str:
    model = transformers_load(path)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    reloaded = transformers_load(out)
    return f"saved and reloaded {type(reloaded).__name__}"


def transformers_load_save(path: str, out: str, dtype: str = "bfloat16") -> str:
    """A plain checkpoint from a quantized one the transformers way: its CPU load dequantizes
    (fp8), then save_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.save_pretrained(out)
    return f"loaded and saved {type(model).__name__} as {dtype}"


def ct_decompress_save(path: str, out: str, dtype: str = "bfloat16") -> str:
    """compressed-tensors' in-memory path: transformers loads and decompresses (run_compressed
    False), then save_pretrained writes the plain model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    model.save_pretrained(out)
    return f"decompressed and saved {type(model).__name__} as {dtype}"


def transformers_quantize_save(path: str, out: str, method: str = "nf4") -> str:
    """What `qfinal quantize` replaces: quantize on load, then save_pretrained."""
    model = transformers_load(path, method)
    model.save_pretrained(out)
    return f"quantized {method} and saved {type(model).__name__}"


def peft_merge_save(base: str, adapter: str, out: str) -> str:
    """What `qfinal merge` replaces: load the base, apply the adapter, merge_and_unload, save."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers_load(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    return f"merged and saved {type(model).__name__}"


TASKS = {
    "qfinal-load-forward": qfinal_load_forward,
    "transformers-load-forward": transformers_load_forward,
    "transformers-load-quantized": transformers_load_quantized,
    "transformers-dequantize": transformers_dequantize,
    "transformers-save-round-trip": transformers_save_round_trip,
    "transformers-load-save": transformers_load_save,
    "ct-decompress-save": ct_decompress_save,
    "transformers-quantize-save": transformers_quantize_save,
    "peft-merge-save": peft_merge_save,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TASKS:
        sys.stderr.write(f"usage: tasks.py {{{'|'.join(TASKS)}}} ARGS...\n")
        return 2
    print(TASKS[argv[0]](*argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
