"""Writing safetensors checkpoints in transformers' layout (shards + index), one shard at a time.

Used where `save_pretrained` cannot be: models loaded from a bnb checkpoint or dequantized, whose
weight converters have no reverse in transformers 5.x.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_nbytes(t) -> int:
    return t.numel() * t.element_size()


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order, like transformers: start a new shard when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count <= 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(folder: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


def write_state_dict(state_dict: Mapping, folder: Path, max_bytes: int) -> list[str]:
    """Write `state_dict` as model.safetensors or numbered shards + index; returns the file names."""
    from safetensors.torch import save_file

    names = list(state_dict)
    plan = plan_shards(((n, tensor_nbytes(state_dict[n])) for n in names), max_bytes)
    files = shard_file_names(len(plan))
    weight_map, total = {}, 0
    for file, keys in zip(files, plan):
        chunk = {}
        seen_storage: set[int] = set()
        for k in keys:
            t = state_dict[k].detach()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in seen_storage:
                t = t.clone()
            elif ptr is not None:
                seen_storage.add(ptr)
            chunk[k] = t.contiguous().cpu()
            weight_map[k] = file
            total += tensor_nbytes(t)
        save_file(chunk, str(folder / file), metadata={"format": "pt"})
    if len(files) > 1:
        write_index(folder, weight_map, total)
    return files
