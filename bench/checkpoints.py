"""The benchmark's checkpoints, generated under bench/out/ (git-ignored) and reused while their spec holds.

* `llama-bf16`: a Llama-shaped bf16 checkpoint with random weights (fixed seed), written shard by
  shard with `safetensors.torch.save_file`, so generating it never holds more than one shard
  (default TinyLlama-1.1B shape, 500 MB shards; `--quick` uses a ~0.2B shape).
* `llama-nf4`: the same model quantized on the fly by transformers + bitsandbytes (nf4) and
  written with `save_pretrained`, the way users make nf4 checkpoints.
* `sparse-70b`: a Llama-70B-shaped checkpoint whose data sections are holes (real headers, no
  data on disk), written by bench/validate_fast_70b.py's `write_checkpoint`.

Every builder runs in its own process (`python bench/checkpoints.py KIND FOLDER --shape NAME`), so
the orchestrator never imports torch and its children's peak RSS is not inflated by it. A folder
is complete when its `.bench-spec.json` matches the spec asked for; otherwise it is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601
SPEC_FILE = ".bench-spec.json"
SHARD_BYTES = 500 * 10**6

# TinyLlama-1.1B geometry; "quick" keeps the vocabulary and layout, shrinks the rest (~0.2B).
SHAPES = {
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    # Llama-2-7B geometry: for "peak RSS is flat in model size" (quantize, merge), run by hand.
    "llama-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "quick-0.2b": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
    ),
}


def llama_tensors(shape: dict) -> list[tuple[str, list[int]]]:
    """Checkpoint keys and shapes, in the order save_pretrained writes a LlamaForCausalLM."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    out = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "mlp.down_proj.weight", [h, inter]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "self_attn.k_proj.weight", [kv, h]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "self_attn.q_proj.weight", [h, h]),
            (p + "self_attn.v_proj.weight", [kv, h]),
        ]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(
    tensors: list[tuple[str, list[int]]], max_bytes: int, itemsize: int
) -> list[list[tuple[str, list[int]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def spec_for(kind: str, shape_name: str) -> dict:
    if kind == "sparse70b":  # one fixed shape (bench/validate_fast_70b.py's)
        shape_name = "llama-70b"
    return {
        "kind": kind,
        "shape": shape_name,
        "geometry": SHAPES.get(shape_name),
        "seed": SEED,
        "shard_bytes": SHARD_BYTES,
        "version": 1,
    }


def is_complete(folder: Path, spec: dict) -> bool:
    try:
        return json.loads((folder / SPEC_FILE).read_text()) == spec
    except (OSError, ValueError):
        return False


def mark_complete(folder: Path, spec: dict) -> None:
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


def logical_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- builders (child processes)


def write_bf16(folder: Path, shape_name: str) -> str:
    """Random bf16 Llama weights, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = SHAPES[shape_name]
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        rms_norm_eps=1e-5,
        architectures=["LlamaForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
    )
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(SEED)
    shards = plan_shards(llama_tensors(shape), SHARD_BYTES, 2)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        chunk = {}
        for name, dims in tensors:
            if len(dims) == 1:  # RMSNorm weights: around 1, as trained models have them
                t = 1.0 + 0.05 * torch.randn(dims, generator=gen)
            else:
                t = torch.randn(dims, generator=gen).mul_(0.02)
            chunk[name] = t.to(torch.bfloat16)
            weight_map[name] = file
            total += chunk[name].numel() * 2
        save_file(chunk, str(folder / file), metadata={"format": "pt"})
        del chunk
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    params = sum(_numel(s) for _, s in llama_tensors(shape))
    return f"{params / 1e9:.2f}B parameters, {total / 1e9:.2f} GB bf16 in {len(shards)} shards"


def write_nf4(folder: Path, source: Path) -> str:
    """transformers' own path: quantize on load with bitsandbytes, then save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=qc, device_map="cpu")
    model.save_pretrained(folder, max_shard_size="500MB")
    return f"nf4, {logical_bytes(folder) / 1e9:.2f} GB on disk"


FP8_BLOCK = 128


def write_fp8(folder: Path, source: Path) -> str:
    """FP8 fine-grained (DeepSeek-V3 layout): every projection weight float8_e4m3fn with a float32
    weight_scale_inv per 128x128 block (absmax / 448), the rest as stored; shard by shard.
    transformers' own FP8 quantizer needs a GPU, so the blocks are computed here."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "modules_to_not_convert": ["lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    weight_map, total = {}, 0
    for file in sorted(set(index["weight_map"].values())):
        chunk = {}
        for name, tensor in load_file(str(source / file)).items():
            if name.endswith("_proj.weight"):
                rows, cols = tensor.shape
                grid = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
                blocks = tensor.float().reshape(grid[0], FP8_BLOCK, grid[1], FP8_BLOCK)
                scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
                chunk[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
                chunk[name.removesuffix(".weight") + ".weight_scale_inv"] = scale
            else:
                chunk[name] = tensor
        for name, tensor in chunk.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        save_file(chunk, str(folder / file), metadata={"format": "pt"})
        del chunk
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return f"fp8 block {FP8_BLOCK}x{FP8_BLOCK}, {logical_bytes(folder) / 1e9:.2f} GB on disk"


def write_ct_w4a16(folder: Path, source: Path) -> str:
    """compressed-tensors W4A16 (int4, symmetric, group 128, pack-quantized), made by the library
    the way llm-compressor does without calibration data: scales from each group's min/max."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            grouped = module.weight.unflatten(-1, (module.weight.shape[-1] // 128, 128))
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.copy_(scale)
            module.weight_zero_point.copy_(zero_point)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder, max_shard_size="500MB")
    compressor.update_config(folder)
    return f"compressed-tensors W4A16 g128, {logical_bytes(folder) / 1e9:.2f} GB on disk"


def write_lora(folder: Path, source: Path) -> str:
    """A LoRA adapter on every linear layer (r=16, alpha 32) of the bf16 model, made by peft with
    random non-zero B (a trained adapter's shape of work; peft's default B is zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(SEED)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(skeleton, lora)
    for name, module in model.named_modules():  # only the adapter leaves meta
        for attr in ("lora_A", "lora_B"):
            layer = getattr(module, attr, None)
            if isinstance(layer, torch.nn.ModuleDict) and "default" in layer:
                shape = layer["default"].weight.shape
                value = torch.randn(shape).mul_(0.01).to(torch.bfloat16)
                layer["default"].weight = torch.nn.Parameter(value)
    model.save_pretrained(folder)
    return f"LoRA r=16 on all linear layers, {logical_bytes(folder) / 1e6:.1f} MB"


def write_sparse_70b(folder: Path) -> str:
    sys.path.insert(0, str(HERE))
    from validate_fast_70b import write_checkpoint  # the teammate's writer, reused as is

    params, total, n_shards = write_checkpoint(folder, 5 * 10**9)
    return (
        f"{params / 1e9:.1f}B parameters, {total / 1e9:.1f} GB logical in {n_shards} sparse shards, "
        f"{disk_bytes(folder) / 2**20:.1f} MiB on disk"
    )


def build(kind: str, folder: Path, shape_name: str, source: Path | None) -> str:
    """Build into a temp folder beside `folder`, then rename it into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if kind == "bf16":
        detail = write_bf16(tmp, shape_name)
    elif kind == "nf4":
        detail = write_nf4(tmp, source)
    elif kind == "fp8":
        detail = write_fp8(tmp, source)
    elif kind == "ct_w4a16":
        detail = write_ct_w4a16(tmp, source)
    elif kind == "lora":
        detail = write_lora(tmp, source)
    elif kind == "sparse70b":
        detail = write_sparse_70b(tmp)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    mark_complete(tmp, spec_for(kind, shape_name))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build one benchmark checkpoint (run by bench/run.py).")
    parser.add_argument("kind", choices=["bf16", "nf4", "fp8", "ct_w4a16", "lora", "sparse70b"])
    parser.add_argument("folder")
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    parser.add_argument("--source", help="the bf16 folder (for nf4, fp8, ct_w4a16 and lora)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    detail = build(args.kind, Path(args.folder), args.shape, Path(args.source) if args.source else None)
    print(f"{args.kind}: {detail} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
