"""What `qfinal dequantize` will write, decided from the headers before any tensor is read.

`SourceReader` maps each key of a safetensors checkpoint to its file (pread, at most two files
open); `plan_items` turns its headers into one `PlanItem` per output tensor: the quantized weights
the format finds (their output shape in the checkpoint's layout, Conv1D transposed back), then
every other tensor as a copy. `ops.dequantize` shards and writes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qfinal.checkpoint.dtypes import torch_dtype_of
from qfinal.checkpoint.reader import TensorReader
from qfinal.checks.keys import checkpoint_lookup
from qfinal.errors import CheckpointError
from qfinal.formats import format_for
from qfinal.formats.base import QuantFormat, Scheme, StoredWeight


def stored_format(config: dict, where: str) -> tuple[QuantFormat, Scheme]:
    """The format and scheme config.json declares; CheckpointError if qfinal cannot dequantize it."""
    fmt = format_for(config)
    if fmt is None:
        qc = config.get("quantization_config")
        found = qc.get("quant_method") if isinstance(qc, dict) else None
        what = "checkpoint is not bitsandbytes-quantized" + (
            f" (quantization_config.quant_method is {found!r})"
            if found
            else " (config.json has no quantization_config)"
        )
        raise CheckpointError(what, where=where, hint="dequantize only reads bnb nf4/fp4/int8 checkpoints")
    return fmt, fmt.scheme(config, where)


class SourceReader(TensorReader):
    """Key -> file map and headers of a safetensors checkpoint; tensors are read with pread (each
    owns the bytes read for it, and no touched input page stays mapped), at most two files open."""

    def __init__(self, folder: Path, confine_to: Path):
        self.folder = folder
        self.confine_to = confine_to
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"unreadable safetensors index ({err})", where=str(index)) from None
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(
                "no safetensors weights (model.safetensors or its index)",
                where=str(folder),
                hint="dequantize reads safetensors checkpoints written by save_pretrained",
            )
        self.paths = [self._confined(name) for name in files]  # sorted: the order tensors are read in
        key_file: dict[str, Path] = {}
        self.headers: dict[str, tuple[str, list[int]]] = {}
        for path in self.paths:
            self._read_header(path, key_file)
        super().__init__(key_file, max_open=2, backend="pread")  # `self.files`: key -> file

    def _read_header(self, path: Path, key_file: dict[str, Path]) -> None:
        from safetensors import safe_open

        try:
            with safe_open(path, "pt", backend="pread") as fh:
                for key in fh.keys():
                    if key in key_file:
                        raise CheckpointError(f"tensor {key!r} is stored in two files", where=str(path))
                    sl = fh.get_slice(key)
                    key_file[key] = path
                    self.headers[key] = (sl.get_dtype(), list(sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises SafetensorError / OSError
            raise CheckpointError(f"cannot read safetensors file ({err})", where=str(path)) from None

    def _confined(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise CheckpointError("weight file named in the index is missing", where=str(path))
        if not path.resolve().is_relative_to(self.confine_to):
            raise CheckpointError(
                "weight file resolves outside the model folder",
                where=str(path),
                hint="refusing to read files outside the checkpoint",
            )
        return path


@dataclass
class PlanItem:
    """One output tensor: what it is made of, its shape and dtype in OUT."""

    name: str  # output tensor name
    kind: str  # "copy", or the format's kind of stored weight
    parts: dict[str, str]  # role -> source key
    shape: list[int]  # output shape (checkpoint layout)
    dtype: torch.dtype  # output dtype
    transpose: bool = False  # Conv1D: dequantized [out, in] -> stored [in, out]
    fmt: QuantFormat | None = None  # the format that dequantizes it (None: a copy)
    weight: StoredWeight | None = None  # what the format rebuilds it from

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _weight_item(
    weight: StoredWeight, fmt: QuantFormat, dtype: torch.dtype, in_conv1d, in_shapes, shapes, where: str
) -> PlanItem:
    """The output item of one quantized weight, in the checkpoint's layout (Conv1D: [in, out])."""
    item = PlanItem(weight.name, weight.kind, weight.parts, list(weight.shape), dtype, fmt=fmt, weight=weight)
    if in_conv1d(item.name.rsplit(".", 1)[0]) is not None:
        if len(item.shape) != 2:
            raise CheckpointError(f"Conv1D weight {item.name!r} has shape {item.shape}", where=where)
        item.transpose = True
        item.shape = [item.shape[1], item.shape[0]]
    known = in_shapes(item.name)
    if known is not None and shapes[known] != item.shape:
        raise CheckpointError(
            f"dequantized {item.name!r} would have shape {item.shape}, the model expects {shapes[known]}", where=where
        )
    return item


def plan_items(
    src: SourceReader, dtype: torch.dtype, fmt: QuantFormat, scheme: Scheme, conv1d, shapes, prefix: str, where: str
) -> list[PlanItem]:
    """Every output tensor, in the order the source files hold them (so they are read one after
    another). `conv1d`/`shapes` are the plain model's layout (`conv1d_layout`)."""
    in_conv1d, in_shapes = checkpoint_lookup(conv1d, prefix), checkpoint_lookup(shapes, prefix)
    weights = fmt.find_weights(src.headers, src.get, scheme, where)
    consumed = {key for w in weights for key in w.parts.values()}
    items = [_weight_item(w, fmt, dtype, in_conv1d, in_shapes, shapes, where) for w in weights]

    # Everything else passes through (floating tensors cast to dtype).
    for key in sorted(set(src.headers) - consumed):
        st_dtype, shape = src.headers[key]
        try:
            torch_dtype = torch_dtype_of(st_dtype)
        except ValueError:
            raise CheckpointError(f"unsupported tensor dtype {st_dtype}", where=f"{where}: {key}") from None
        out_dtype = dtype if torch_dtype.is_floating_point else torch_dtype
        items.append(PlanItem(key, "copy", {"tensor": key}, list(shape), out_dtype))

    # Output order: source file order, then name, so input files are read one after another.
    file_rank = {path: i for i, path in enumerate(src.paths)}
    return sorted(items, key=lambda it: (file_rank[src.files[next(iter(it.parts.values()))]], it.name))
