"""Where a model comes from: a local folder, a hub id already in the local cache, or `demo`.

qfinal never downloads: a hub id must already be in the Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qfinal.errors import SourceError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A resolved model folder. `confine_to` is the folder every read must stay inside."""

    label: str
    folder: Path
    confine_to: Path


def resolve_source(source: str | Path) -> Source:
    text = str(source)
    if text == "demo":
        from qfinal.checkpoint.demo import ensure_demo_checkpoint

        folder = ensure_demo_checkpoint()
        return Source("demo", folder, folder)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError("not a folder", where=text, hint="pass the folder that holds config.json and the weights")
        return Source(text, path.resolve(), path.resolve())
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return _from_cache(text)
    raise SourceError(
        "path does not exist", where=text, hint="pass a model folder, a hub id that is in the local cache, or 'demo'"
    )


def hub_cache_dir() -> Path:
    """Read at call time (huggingface_hub reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def _from_cache(repo_id: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise SourceError(
            "hub id is not in the local Hugging Face cache (qfinal never downloads)",
            where=repo_id,
            hint="run `hf download " + repo_id + "` on a machine with network, or pass a local folder",
        ) from None
    # snapshots/<rev>/file -> ../../blobs/<hash>: the repo's cache folder is the confinement root.
    return Source(repo_id, snapshot, snapshot.parent.parent.resolve())


def read_config_json(folder: Path) -> dict:
    """config.json as a dict, with errors a user can act on."""
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(
            "no config.json in the model folder",
            where=str(folder),
            hint="point at the folder written by save_pretrained",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: JSONDecodeError, ints over the digit limit
        raise SourceError(
            f"config.json is not valid JSON ({err})", where=str(path), hint="repair or regenerate config.json"
        ) from None
    except RecursionError:
        raise SourceError(
            "config.json is nested too deeply", where=str(path), hint="repair or regenerate config.json"
        ) from None
    if not isinstance(data, dict):
        raise SourceError("config.json must hold a JSON object", where=str(path))
    return data
