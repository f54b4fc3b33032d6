"""`qfinal validate --fast` on a 70B-shaped Llama checkpoint: wall time and peak RSS.

The checkpoint is written as sparse files: each shard gets a real safetensors header with correct
offsets, then `truncate` extends it to its full size, so the ~140 GB data section is a hole that
uses no disk. Fast mode must never read tensor data, so the holes are never touched (reading
them would return zeros, slowly). The validate run is a child process; its peak RSS comes from
`os.wait4`, which reports that child alone.

    python bench/validate_fast_70b.py [--keep DIR] [--shard-gb 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Llama-2-70B / Llama-3-70B geometry (vocab as Llama 2).
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 8192, 80, 64, 8, 28672, 32000
DTYPE, DTYPE_BYTES = "BF16", 2


def tensor_shapes() -> list[tuple[str, list[int]]]:
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
            (p + "self_attn.k_proj.weight", [kv, HIDDEN]),
            (p + "self_attn.v_proj.weight", [kv, HIDDEN]),
            (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
            (p + "mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]),
            (p + "mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]),
            (p + "mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]),
            (p + "input_layernorm.weight", [HIDDEN]),
            (p + "post_attention_layernorm.weight", [HIDDEN]),
        ]
    out += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    return out


def nbytes(shape: list[int]) -> int:
    n = DTYPE_BYTES
    for d in shape:
        n *= d
    return n


def write_sparse_shard(path: Path, tensors: list[tuple[str, list[int]]]) -> int:
    """A valid safetensors file whose data section is a hole. Returns its data size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in tensors:
        size = nbytes(shape)
        header[name] = {"dtype": DTYPE, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + pos)
    return pos


def write_checkpoint(folder: Path, shard_bytes: int) -> tuple[int, int, int]:
    """config.json + sharded sparse safetensors + index. Returns (params, logical bytes, shards)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(folder)

    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes():
        if shards[-1] and size + nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_sparse_shard(folder / name, tensors)
        weight_map.update((t, name) for t, _ in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    params = sum(nbytes(s) // DTYPE_BYTES for _, s in tensor_shapes())
    return params, total, len(shards)


def disk_usage(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir())


def run_validate(folder: Path) -> tuple[int, float, int, str, str]:
    """Run the CLI in a child; returns (exit code, wall seconds, peak RSS bytes, stdout, stderr)."""
    cmd = [sys.executable, "-m", "qfinal", "validate", "--fast", str(folder), "--json", "-"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return proc.returncode, wall, peak, stdout, stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write the checkpoint here and keep it (default: a temp dir, removed)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, in GB (default 5)")
    args = parser.parse_args()

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qfinal-70b-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        params, total, n_shards = write_checkpoint(folder, int(args.shard_gb * 1e9))
        print(
            f"checkpoint: {params / 1e9:.1f}B parameters, {total / 1e9:.1f} GB logical in {n_shards} "
            f"sparse shards, {disk_usage(folder) / 2**20:.1f} MiB on disk, written in "
            f"{time.perf_counter() - t0:.2f} s -> {folder}"
        )
        code, wall, peak, stdout, stderr = run_validate(folder)
        print(f"qfinal validate --fast: exit {code}, wall {wall:.2f} s, peak RSS {peak / 2**20:.0f} MiB")
        try:
            report = json.loads(stdout)
        except json.JSONDecodeError:
            print("stdout is not JSON:\n" + stdout[-2000:] + "\nstderr:\n" + stderr[-2000:])
            return 1
        for stage in report["stages"]:
            print(
                f"  stage {stage['name']:<22} {stage['status']:<16} {stage['seconds']:7.3f} s  "
                f"peak {stage['peak_rss_bytes'] / 2**20:6.0f} MiB  {stage['detail']}"
            )
        bad = [f for f in report["findings"] if f["severity"] != "info"]
        print(f"  checks: {len(report['checks'])}, findings: {len(report['findings'])} ({len(bad)} error/warning)")
        for f in bad[:10]:
            print(f"    {f['severity']} {f['check']} {f['key']}: {f['message']}")
        return 0 if code == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
