"""The files beside a checkpoint's weights (tokenizer, generation config, ...), copied into a new one.

`merge`, `quantize` and `dequantize` write new weights, an index and a config.json, and keep the
rest of the folder as it is: one rule for what the rest is, so the three commands agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Collection

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def copy_side_files(folder: Path, confine_to: Path, tmp: Path, skip: Collection[str] = ("config.json",)) -> list[str]:
    """Copy into `tmp` each plain file of `folder` that is not hidden, a weight file, an index, named in
    `skip` (the files the caller writes itself) or outside `confine_to`; returns their names, sorted."""
    copied = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name in skip or name.endswith(WEIGHT_SUFFIXES) or not path.is_file():
            continue
        if name.endswith(".index.json") or not path.resolve().is_relative_to(confine_to):
            continue
        shutil.copyfile(path, tmp / name)
        copied.append(name)
    return copied
