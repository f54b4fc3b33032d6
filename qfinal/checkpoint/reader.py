"""Reading tensors from safetensors files: by name through safe_open, or one at a time as the
loader asks for them.

`TensorReader` serves callers that want a few tensors by name (tie audits, per-layer quality,
dequantize's inputs). `read_tensor_by_tensor` serves the loader when it quantizes on load: lazy
`TensorSlice`s, each read, quantized and freed in turn, with `HeapReleaser` handing the freed heap
back to the kernel as it goes. Figures for the choices made here are in bench/README.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping


class TensorReader:
    """Tensors by name from safetensors files, each file opened with safe_open on its first read.

    `files` maps each tensor name to its file; nothing checks where a file is, so build it from
    paths already proven to stay inside the model folder (`for_inventory` does). The `max_open`
    most recently read files stay open until `close()`; 0 closes each file after its read.
    `backend` is safe_open's (None: its default, mmap).
    """

    def __init__(self, files: Mapping[str, Path | str], *, max_open: int = 2, backend: str | None = None):
        self.files = files
        self._max_open = max_open
        self._backend = backend
        self._open: OrderedDict[Path | str, object] = OrderedDict()

    @classmethod
    def for_inventory(cls, inventory, folder: Path | None = None, **options) -> "TensorReader":
        """A reader of a safetensors inventory's tensors, whose files `inspect_checkpoint` confined to
        the model folder. `folder` is where its file names are (default: the inventory's root)."""
        root = Path(folder if folder is not None else inventory.root)
        return cls({key: root / entry.file for key, entry in inventory.tensors.items()}, **options)

    def __contains__(self, key) -> bool:
        return key in self.files

    def get(self, key: str):
        """The tensor `key` (KeyError if no file holds it), read with safe_open's `get_tensor`."""
        path = self.files[key]
        handle = self._open.get(path)
        if handle is None:
            self._keep(self._max_open - 1)  # room for this one
            from safetensors import safe_open

            options = {} if self._backend is None else {"backend": self._backend}
            handle = safe_open(str(path), framework="pt", **options).__enter__()
            self._open[path] = handle
        else:
            self._open.move_to_end(path)
        try:
            return handle.get_tensor(key)
        finally:
            self._keep(self._max_open)

    def _keep(self, count: int) -> None:
        """Close the least recently read files until at most `count` stay open."""
        while self._open and len(self._open) > max(count, 0):
            _path, handle = self._open.popitem(last=False)
            handle.__exit__(None, None, None)

    def close(self) -> None:
        self._keep(0)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- quantize on load

TRIM_EVERY_BYTES = 64 << 20  # about one decoder layer of a 1B model in bf16


class HeapReleaser:
    """Gives glibc's free heap pages back to the kernel after every `every` bytes read.

    Quantizing on load allocates the kernel's fp32 temporaries (and the small tensors' copies)
    through malloc and keeps the small packed results: these end up between the freed blocks, so
    the heap cannot shrink from its top and, from run to run, kept hundreds of MB the process
    never used again. `malloc_trim(0)` returns the free pages in the middle of the heap as well;
    once per ~64 MB read it held the peak steady at no measurable cost, where trimming before
    every read cost time (bench/README, the `malloc_trim` line). It changes no allocator setting.
    Outside glibc it does nothing.
    """

    def __init__(self, every: int | None = None):
        import ctypes

        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            self._trim = None
        self.every = TRIM_EVERY_BYTES if every is None else every
        self.pending = 0

    def before_read(self, nbytes: int) -> None:
        """Called as each tensor is read: the temporaries of the ones before it are freed by now."""
        if self._trim is None:
            return
        if self.pending >= self.every:
            self.release()
            self.pending = 0
        self.pending += nbytes

    def release(self) -> None:
        self._trim(0)


# Tensors of at least this many bytes are mapped (their own mapping), smaller ones copied with pread:
# a mapping costs a few system calls and an entry in the process's map table (vm.max_map_count),
# and the unquantized small tensors (norms, biases) stay alive with the model.
MAP_AT_LEAST = 1 << 20


class TensorSlice:
    """One checkpoint tensor, read when transformers' loader indexes it (`slice[...]`).

    A tensor of MAP_AT_LEAST bytes or more gets a private mapping of just its own pages, which
    goes when the tensor does: quantized, it is freed and unmapped, and no shard page stays in RSS
    (one whole-shard mapping, as safetensors makes, stays alive while any unquantized leaf of that
    shard does). Mapping reads the page cache in place, where a `preadv` into a new buffer copies
    every byte and faults in fresh memory (bench/README, the TensorSlice line). Smaller tensors
    are read with one `preadv`. transformers loads synchronously when it quantizes on the fly:
    one tensor is read, quantized and freed at a time, in its main thread. The bytes are the
    file's, so the tensor equals safetensors' bit for bit.
    """

    __slots__ = ("fd", "offset", "shape", "dtype", "st_dtype", "file", "nbytes", "heap", "on_read")

    def __init__(
        self,
        fd: int,
        offset: int,
        shape,
        dtype,
        st_dtype: str,
        file: str,
        nbytes: int,
        heap: HeapReleaser | None = None,
        on_read: Callable[[int], None] | None = None,
    ):
        self.fd, self.offset, self.shape, self.dtype, self.st_dtype = fd, offset, list(shape), dtype, st_dtype
        self.file, self.nbytes, self.heap, self.on_read = file, nbytes, heap, on_read

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.st_dtype

    def _truncated(self):
        from qfinal.errors import CheckpointError

        return CheckpointError("file ended before the tensor's data (truncated while loading?)", where=self.file)

    def _mapped(self):
        import math
        import mmap
        import os

        import torch

        if os.fstat(self.fd).st_size < self.offset + self.nbytes:  # a page past the end would be a SIGBUS
            raise self._truncated()
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self.fd, self.offset + self.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        # the tensor holds the mapping: unmapped when the tensor (and every view of it) is freed
        return torch.frombuffer(
            mapping, dtype=self.dtype, count=math.prod(self.shape), offset=self.offset - start
        ).reshape(self.shape)

    def _read(self):
        import os

        import torch

        tensor = torch.empty(self.shape, dtype=self.dtype)
        if tensor.numel():
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], self.offset + done)
                if n <= 0:
                    raise self._truncated()
                done += n
        return tensor

    def __getitem__(self, index):
        if self.heap is not None:
            self.heap.before_read(self.nbytes)
        tensor = self._mapped() if self.nbytes and self.nbytes >= MAP_AT_LEAST else self._read()
        if self.on_read is not None:
            self.on_read(self.nbytes)
        return tensor if index is Ellipsis else tensor[index]


@contextmanager
def read_tensor_by_tensor(files: list[str], progress: Callable[[int, int], None] | None = None):
    """Lazy `TensorSlice`s for every tensor: each is read, quantized and freed.

    Quantizing on load touches every page of the bf16 shards once; with safetensors' whole-file
    mappings those pages stay in the process's RSS until the file is closed, and the unquantized
    leaves (embeddings, norms, the head) keep every shard's mapping alive. Read tensor by tensor,
    the peak holds about the packed model instead, bit-identical (bench/README.md).
    `progress(bytes read, total bytes)` is called after each tensor is read.
    """
    import os
    import struct

    from qfinal.checkpoint.dtypes import torch_dtype_of
    from qfinal.checkpoint.headers import read_safetensors_header

    fds, state, heap = [], {}, HeapReleaser()
    try:
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            fds.append(fd)
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            entries, _meta = read_safetensors_header(Path(file))
            for key, entry in entries.items():
                state[key] = TensorSlice(
                    fd,
                    8 + header_len + entry.start,
                    entry.shape,
                    torch_dtype_of(entry.dtype),
                    entry.dtype,
                    file,
                    entry.nbytes,
                    heap,
                )
        if progress is not None:
            total, done = sum(s.nbytes for s in state.values()), 0

            def on_read(nbytes: int) -> None:
                nonlocal done
                done += nbytes
                progress(done, total)

            for tensor_slice in state.values():
                tensor_slice.on_read = on_read
        yield state
    finally:
        for fd in fds:  # the mappings outlive their descriptor
            os.close(fd)
