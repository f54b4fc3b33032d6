"""Large tensors read from a safetensors file a slab of whole rows at a time.

safetensors' `get_slice` reads the whole tensor before slicing it, so a command that touches every
tensor once (`quantize`, `merge`) would peak at its largest tensor plus that tensor's temporaries:
the 7B embedding is 262 MB in bf16, 524 MB in fp32. Reading slabs with pread at the header's
offset bounds the working memory by `chunk_bytes()` instead, whatever the model's size.
"""

from __future__ import annotations

import functools
import math
import os

CHUNK_ENV = "QFINAL_CHUNK_BYTES"  # read at each call: bytes of working memory per slab
CHUNK_BYTES = 16 << 20


def chunk_bytes() -> int:
    value = os.environ.get(CHUNK_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else CHUNK_BYTES


def rows_per_slab(shape, bytes_per_element: int, row_multiple: int = 1) -> int | None:
    """Rows per slab so that one slab's elements times `bytes_per_element` (the widest copy the
    caller makes of them) fit `chunk_bytes()`, a multiple of `row_multiple`; None when the tensor
    should be read whole (1-D, empty, or no larger than one slab)."""
    if len(shape) < 2 or shape[0] <= 1:
        return None
    cols = math.prod(shape[1:])
    if cols == 0:
        return None
    rows = max(1, chunk_bytes() // (cols * bytes_per_element))
    rows = max(row_multiple, rows // row_multiple * row_multiple)
    return rows if rows < shape[0] else None


def slab_bounds(rows: int, step: int | None, absorb_tail: bool = False) -> list[tuple[int, int]]:
    """(start, end) of each slab of `step` rows (None: one slab); with `absorb_tail` a last slab
    shorter than `step` joins the one before it."""
    if step is None or step >= rows:
        return [(0, rows)]
    starts = list(range(0, rows, step))
    if absorb_tail and len(starts) > 1 and rows - starts[-1] < step:
        starts.pop()
    return list(zip(starts, starts[1:] + [rows]))


def data_start(path: str, key: str) -> int:
    """Where `key`'s bytes start in the safetensors file `path`, from its header read and validated
    once per version of the file (`checkpoint.headers`), not once per tensor read."""
    stat = os.stat(path)
    return _data_starts(path, stat.st_size, stat.st_mtime_ns)[key]


@functools.lru_cache(maxsize=32)
def _data_starts(path: str, size: int, mtime_ns: int) -> dict[str, int]:
    """Each tensor's absolute byte offset in `path` (`size` and `mtime_ns` key the cache)."""
    from pathlib import Path

    from qfinal.checkpoint.headers import read_safetensors_header

    tensors, _metadata = read_safetensors_header(Path(path))
    with open(path, "rb") as fh:
        header_end = 8 + int.from_bytes(fh.read(8), "little")
    return {name: header_end + entry.start for name, entry in tensors.items()}


class Workspace:
    """Named buffers reused from slab to slab. Slabs of 16 MiB allocated afresh each time come
    from glibc's heap once its mmap threshold has grown past them, and the heap then kept ~200 MB
    the merge of the 1.1B never used again; trimming it after every slab cost 40 % more time in
    page faults. Reused buffers cost neither."""

    def __init__(self):
        self._buffers: dict[str, object] = {}

    def take(self, name: str, dtype, shape):
        """A tensor of `dtype` and `shape` over buffer `name` (grown as needed); what it held before
        is overwritten."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)


def read_row_slabs(path: str, key: str, stored, shape, bounds, workspace: Workspace | None = None):
    """(first row, slab) for each (start, end) rows of `bounds` of `key` (torch dtype `stored`): a
    fresh tensor, or with `workspace` its "read" buffer, overwritten by the next slab."""
    import numpy as np
    import torch

    row_bytes = math.prod(shape[1:]) * stored.itemsize
    start = data_start(path, key)
    fd = os.open(path, os.O_RDONLY)
    try:
        for first, end in bounds:
            rows = end - first
            if workspace is None:
                buffer = np.empty(rows * row_bytes, np.uint8)
            else:
                buffer = workspace.take("read", torch.uint8, [rows * row_bytes]).numpy()
            view, done = memoryview(buffer), 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], start + first * row_bytes + done)
                if got <= 0:
                    raise OSError(f"{path}: unexpected end of file reading {key!r}")
                done += got
            yield first, torch.from_numpy(buffer).view(stored).reshape(rows, *shape[1:])
    finally:
        os.close(fd)


def read_tensor(path: str, key: str, stored, shape):
    """`key` of `path` whole, as a fresh tensor of torch dtype `stored`, read with pread: pages of
    a memory map would stay in the process's RSS after the tensor is gone."""
    rows = shape[0] if shape else 1
    [(_first, value)] = list(read_row_slabs(path, key, stored, list(shape) or [1], [(0, rows)]))
    return value.reshape(shape)
