"""The files beside a checkpoint's weights (tokenizer, generation config, ...), copied into a new one.

`merge`, `quantize` and `dequantize` write new weights, an index and a config.json, and keep the
rest of the folder as it is: one rule for what the rest is, so the three commands agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Collection

from qfinal.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def copy_side_files(folder: Path, confine_to: Path, tmp: Path, skip: Collection[str] = ("config.json",)) -> list[str]:
    """Copy into `tmp` each plain file of `folder` that is not hidden, a weight file, an index or named
    in `skip` (the files the caller writes itself); returns their names, sorted. A file that resolves
    outside `confine_to` is refused (CheckpointError), as the weights are."""
    copied = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name in skip or name.endswith(WEIGHT_SUFFIXES) or not path.is_file():
            continue
        if name.endswith(".index.json"):
            continue
        if not path.resolve().is_relative_to(confine_to):  # a link out of the checkpoint: an escape
            raise CheckpointError(
                "file resolves outside the model folder",
                where=str(path),
                hint="refusing to copy files from outside the checkpoint",
            )
        shutil.copyfile(path, tmp / name)
        copied.append(name)
    return copied
