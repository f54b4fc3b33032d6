"""A shard index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) as untrusted JSON.

`read_index` records every problem on the inventory instead of raising: duplicate names (which
json.loads would silently collapse), weight-map values that are not file names, a missing
"metadata" object transformers would crash on. `inventory.inspect_checkpoint` calls it once the
index file is proven to stay inside the model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qfinal.checkpoint.headers import JsonRefused, check_json_text, escape_key, strict_json_loads

if TYPE_CHECKING:  # pragma: no cover
    from qfinal.checkpoint.inventory import CheckpointInventory

# Index files are JSON we parse whole; the largest real ones are a few MB.
MAX_INDEX_SIZE = 100_000_000


def read_index(inv: CheckpointInventory, path: Path, index_name: str) -> dict | None:
    """Parse and shape-check an index file (already confined); its weight map, or None once a
    problem is recorded. Fills `inv.index` and `inv.sharded_metadata`."""
    parsed = _load_index_json(inv, path, index_name)
    if parsed is None:
        return None
    doc, dups = parsed
    bad = lambda msg: inv.add("index_consistency", msg, file=index_name)  # noqa: E731
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        bad('index has no "weight_map" object')
        return None
    if not weight_map:  # transformers would index an empty shard list
        bad('index "weight_map" is empty: it names no tensor')
        return None
    for k, v in weight_map.items():
        if not isinstance(v, str):
            inv.add(
                "index_consistency",
                f"weight_map value must be a file name, not {type(v).__name__}",
                file=index_name,
                key=k,
            )
    if any(not isinstance(v, str) for v in weight_map.values()):
        return None
    for k, first, second in dups:
        if isinstance(first, str) and isinstance(second, str) and k in weight_map:
            inv.add(
                "index_consistency",
                f"listed twice in the index: in '{escape_key(first)}' and in '{escape_key(second)}'",
                file=index_name,
                key=k,
            )
        else:
            inv.add("index_consistency", f"duplicate name '{escape_key(k)}' in the index JSON", file=index_name)
    metadata = doc.get("metadata")
    if metadata is None:
        # transformers' get_checkpoint_shard_files does index["metadata"]: it would crash.
        bad('index has no "metadata" object (transformers requires one; {} is enough)')
        metadata = {}
    elif not isinstance(metadata, dict):
        bad(f'index "metadata" must be an object, not {type(metadata).__name__}')
        metadata = {}
    inv.index = doc
    # Exactly what transformers.utils.hub.get_checkpoint_shard_files builds.
    inv.sharded_metadata = dict(metadata)
    inv.sharded_metadata["all_checkpoint_keys"] = list(weight_map.keys())
    inv.sharded_metadata["weight_map"] = weight_map.copy()
    return weight_map


def _load_index_json(inv: CheckpointInventory, path: Path, index_name: str) -> tuple[dict, list] | None:
    """(the index as a JSON object, its duplicate names); None once a problem is recorded. Duplicate
    names become problems, not parse failures."""
    bad = lambda msg: inv.add("index_consistency", msg, file=index_name)  # noqa: E731
    try:
        size = path.stat().st_size
        if size > MAX_INDEX_SIZE:
            bad(f"index is {size} bytes, over the {MAX_INDEX_SIZE}-byte limit")
            return None
        raw = path.read_bytes()
    except OSError as err:
        bad(f"index cannot be read ({err.strerror or type(err).__name__})")
        return None
    dups: list[tuple[str, object, object]] = []

    def pairs(items):
        out = {}
        for k, v in items:
            check_json_text(k, "name")
            if isinstance(v, str):
                check_json_text(v, "value")
            if k in out:
                dups.append((k, out[k], v))
            out[k] = v
        return out

    try:
        doc = strict_json_loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except UnicodeDecodeError as err:
        bad(f"index is not valid UTF-8 (byte {err.start})")
        return None
    except JsonRefused as err:
        bad(f"index JSON refused: {err}")
        return None
    except ValueError as err:
        bad(f"index is not valid JSON ({str(err).splitlines()[0][:200]})")
        return None
    except RecursionError:
        bad("index JSON is nested too deeply")
        return None
    if not isinstance(doc, dict):
        bad(f"index must be a JSON object, not {type(doc).__name__}")
        return None
    return doc, dups
