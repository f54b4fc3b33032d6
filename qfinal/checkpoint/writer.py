"""Writing safetensors checkpoints in transformers' layout (shards + index), one shard at a time.

`write_state_dict` is used where `save_pretrained` cannot be: models loaded from a bnb checkpoint
or dequantized, whose weight converters have no reverse in transformers 5.x. `save_file_mapped`
writes the bytes of safetensors' `save_file` on every core; `save_pretrained` itself writes with
it in `qfinal save` (`compat.transformers.save_pretrained`), and so does `write_state_dict`.

`ShardWriter` / `write_safetensors_streaming` write one safetensors file without holding it in
memory: the header (names, dtypes, shapes, offsets) is written first from the planned entries,
then each tensor's bytes go to their offset as the tensor is produced. The bytes are those of
`safetensors.torch.save_file` (0.8) for the same tensors: tensors laid out by dtype (descending,
in safetensors' `Dtype` order), then by name; the header is compact JSON, UTF-8, "__metadata__"
first, padded with spaces to a multiple of 8 bytes, after its little-endian u64 length.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from qfinal.checkpoint.dtypes import RANK, TORCH_TO_CODE, element_size, safetensors_dtype

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


def write_index(
    folder: Path, weight_map: Mapping[str, str], total_size: int, total_parameters: int | None = None
) -> None:
    """The shard index as `save_pretrained` writes it: keys sorted, indented by 2, a final newline;
    the metadata's `total_parameters` only when given (`qfinal quantize` writes it, as transformers does)."""
    metadata = {"total_size": total_size}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    index = {"metadata": metadata, "weight_map": dict(weight_map)}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_state_dict(state_dict: Mapping, folder: Path, max_bytes: int) -> list[str]:
    """Write `state_dict` as model.safetensors or numbered shards + index; returns the file names."""
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
        save_file_mapped(chunk, folder / file, metadata={"format": "pt"})
    if len(files) > 1:
        write_index(folder, weight_map, total)
    return files


# --------------------------------------------------------------------------- mapped writer


def _mapped_plan(tensors, metadata) -> tuple[bytes, dict[str, tuple]] | None:
    """(header, layout) when `save_file_mapped` can write `tensors` itself, else None: anything
    save_file would refuse or treat specially (not a dict of dense contiguous CPU tensors, shared
    storage, a dtype without a streaming name, metadata of several keys) is left to save_file."""
    import torch

    if sys.byteorder != "little" or not isinstance(tensors, dict) or not tensors:
        return None
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 1):
        return None
    areas = []
    entries = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu":
            return None
        if not t.is_contiguous() or str(t.dtype).removeprefix("torch.") not in TORCH_TO_CODE:
            return None
        if t.numel():
            areas.append((t.data_ptr(), t.data_ptr() + tensor_nbytes(t)))
        entries.append((name, t.dtype, t.shape))
    areas.sort()
    if any(start < previous_end for (_s, previous_end), (start, _e) in zip(areas, areas[1:])):
        return None  # overlapping tensors: save_file refuses them, in its own words
    try:
        return safetensors_layout(entries, metadata)
    except ValueError:  # a name or metadata save_file judges in its own words
        return None


def save_file_mapped(tensors, filename: Path | str, metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, same arguments, same bytes, written faster.

    save_file writes from one thread holding the GIL. Here the file is sized and its blocks
    reserved first (a full disk is then an OSError, not a SIGBUS in the copy), mapped, and each
    tensor is copied in with torch, whose copy runs on every intra-op thread: the page-cache pages
    are faulted in on all cores, which matters where a fresh page costs a hypervisor fault
    (bench/README "sixth performance pass"). Tensors save_file would refuse or treat specially go
    to save_file itself, so every error is its own.
    """
    import torch

    plan = _mapped_plan(tensors, metadata)
    if plan is not None:
        header, layout = plan
        size = len(header) + max(end for *_x, end in layout.values())
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                    raise
                plan = None  # this filesystem cannot reserve blocks: save_file rewrites the file
            if plan is not None:
                with mmap.mmap(fd, size) as mapped:
                    mapped[: len(header)] = header
                    target = torch.frombuffer(mapped, dtype=torch.uint8)
                    base = len(header)
                    for name, (_dtype, _shape, start, end) in layout.items():
                        if end > start:
                            target[base + start : base + end].copy_(tensors[name].reshape(-1).view(torch.uint8))
                    del target  # releases the mapping's buffer, so that it can close
        finally:
            os.close(fd)
    if plan is None:
        from safetensors.torch import save_file

        save_file(tensors, str(filename), metadata=metadata)


# --------------------------------------------------------------------------- streaming writer


def safetensors_layout(
    entries: Iterable[tuple[str, object, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple]]:
    """(header, layout) of the safetensors file holding `entries` = (name, torch dtype, shape).

    `header` is the whole prefix of the file (u64 length + padded JSON); `layout` maps each name to
    (torch dtype, shape, start, end), offsets relative to the end of the header. Same bytes as
    save_file's for the same tensors, provided `metadata` has at most one key (safetensors keeps
    metadata in a hash map, so its order of several keys varies from run to run; here: as given).
    """
    table: dict[str, tuple] = {}
    for name, dtype, shape in entries:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in table:
            raise ValueError(f"tensor {name!r} listed twice")
        shape = [int(d) for d in shape]
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
        table[name] = (dtype, shape, safetensors_dtype(dtype))
    order = sorted(table, key=lambda n: (-RANK[table[n][2]], n))  # str order == UTF-8 byte order
    header: dict = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    layout: dict[str, tuple] = {}
    pos = 0
    for name in order:
        dtype, shape, st = table[name]
        count = 1
        for d in shape:
            count *= d
        end = pos + count * element_size(st)
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [pos, end]}
        layout[name] = (dtype, shape, pos, end)
        pos = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, layout


def write_header_stub(path: Path | str, header: bytes, size: int) -> None:
    """A safetensors file's `header` (the whole prefix) at the file's full `size`, the data a hole:
    a sparse file for what reads headers only (hub header-only modes, a dry run's outline)."""
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(size)


class PositionalFile:
    """A new file written by offset, in any order, as fast as the disk allows.

    Where the filesystem supports it, whole 4 KiB blocks go through O_DIRECT from a page-aligned
    staging buffer, written by a helper thread while the caller computes the next tensor; the
    few bytes at each end of a write that do not fill a block go through the page cache: buffered
    writes cost kernel CPU that competes with the arithmetic (bench/README, the `dequantize`
    O_DIRECT line). A block is only ever written one way,
    so the two paths never overlap; `close` waits for every write, and the caller's fsync then
    makes the whole file durable (atomic_dir does). No O_DIRECT (tmpfs, other systems): buffered.
    """

    BLOCK = max(4096, mmap.PAGESIZE)  # never share a memory page between the two paths
    CHUNK = 8 << 20  # bytes per direct write; two staging buffers of this size

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct: int | None = None
        direct_flag = getattr(os, "O_DIRECT", 0)
        if direct_flag:
            try:
                self._direct = os.open(self.path, os.O_WRONLY | direct_flag)
            except OSError:  # EINVAL: this filesystem has no direct I/O
                self._direct = None
        self._pool = None
        self._free: list = []
        self._inflight: list = []  # (future, buffer)

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def _pwrite_all(self, fd: int, data, offset: int) -> None:
        # every view released even when pwrite fails (ENOSPC): a view kept alive by the error's
        # traceback would keep a staging buffer from closing (BufferError instead of the error)
        with memoryview(data) as raw, raw.cast("B") as view:
            done = 0
            while done < len(view):
                with view[done:] as rest:
                    done += os.pwrite(fd, rest, offset + done)

    def _direct_job(self, buffer, n: int, offset: int) -> None:
        with memoryview(buffer) as whole, whole[:n] as staged:
            try:
                self._pwrite_all(self._direct, staged, offset)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._pwrite_all(self._fd, staged, offset)  # refused after all: buffered

    def _staging(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, "qfinal-direct-write")
            self._free = [mmap.mmap(-1, self.CHUNK) for _ in range(2)]  # page-aligned
        while not self._free:
            future, buffer = self._inflight.pop(0)
            self._free.append(buffer)
            future.result()  # re-raises the write's error (ENOSPC...)
        return self._free.pop()

    def write(self, offset: int, data) -> None:
        """Put `data` (a buffer) at `offset`; ranges of different calls must not overlap."""
        view = memoryview(data).cast("B")
        end = offset + len(view)
        first = -(-offset // self.BLOCK) * self.BLOCK  # whole blocks: [first, last)
        last = end // self.BLOCK * self.BLOCK
        if self._direct is None or last - first < self.BLOCK:
            self._pwrite_all(self._fd, view, offset)
            return
        self._pwrite_all(self._fd, view[: first - offset], offset)
        self._pwrite_all(self._fd, view[last - offset :], last)
        for start in range(first, last, self.CHUNK):
            n = min(self.CHUNK, last - start)
            buffer = self._staging()
            buffer[:n] = view[start - offset : start - offset + n]
            self._inflight.append((self._pool.submit(self._direct_job, buffer, n, start), buffer))

    def close(self, *, wait_errors: bool = True) -> None:
        """Wait for every write (re-raising the first error unless `wait_errors` is False), close."""
        error = None
        for future, buffer in self._inflight:
            exc = future.exception()
            error = error or exc
            buffer.close()
        for buffer in self._free:
            buffer.close()
        self._inflight, self._free = [], []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in (self._direct, self._fd):
            if fd is not None:
                os.close(fd)
        self._direct = self._fd = None
        if error is not None and wait_errors:
            raise error


class ShardWriter:
    """One safetensors file, written a tensor at a time: only the tensor being written is in memory.

    The header is written on opening; `write(name, tensor)` puts each tensor's bytes at its offset,
    in any order; `close()` checks that every entry was written. Used as a context manager, an
    exception inside the block closes the file without that check (the caller removes it; qfinal
    writes inside `atomic_dir`, which does).
    """

    def __init__(
        self,
        path: Path | str,
        entries: Iterable[tuple[str, object, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ):
        if sys.byteorder != "little":
            raise NotImplementedError("the streaming safetensors writer needs a little-endian host")
        self.path = Path(path)
        header, self.layout = safetensors_layout(entries, metadata)
        self._base = len(header)
        self.size = self._base + max((end for *_x, end in self.layout.values()), default=0)
        self._pending = set(self.layout)
        self._filled: dict[str, int] = {}  # bytes written so far of the entries written in pieces
        self._file = PositionalFile(self.path)
        try:
            self._file.write(0, header)
        except BaseException:
            self._file.close(wait_errors=False)
            raise

    def write(self, name: str, tensor) -> None:
        if name not in self.layout:
            raise ValueError(f"{self.path.name}: tensor {name!r} is not in the planned header")
        if name not in self._pending:
            raise ValueError(f"{self.path.name}: tensor {name!r} written twice")
        dtype, shape, start, end = self.layout[name]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise ValueError(
                f"{self.path.name}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"the header says {dtype} {shape}"
            )
        import torch

        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous().reshape(-1)
        if data.numel():
            data = data.view(torch.uint8).numpy()
            assert data.nbytes == end - start
            self._file.write(self._base + start, memoryview(data))
        self._pending.discard(name)

    def write_part(self, name: str, at: int, piece) -> None:
        """Put `piece`'s bytes at byte `at` of entry `name`: a large tensor written as it is produced,
        in pieces that must not overlap; the entry counts as written once all its bytes are."""
        if name not in self._pending:
            raise ValueError(f"{self.path.name}: tensor {name!r} is not in the planned header or written twice")
        import torch

        data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        _dtype, _shape, start, end = self.layout[name]
        filled = self._filled.get(name, 0) + data.nbytes
        if at < 0 or at + data.nbytes > end - start or filled > end - start:
            raise ValueError(f"{self.path.name}: a piece of {name!r} falls outside its {end - start} bytes")
        if data.nbytes:
            self._file.write(self._base + start + at, memoryview(data))
        self._filled[name] = filled
        if filled == end - start:
            self._pending.discard(name)

    def close(self) -> None:
        """Close the file; ValueError if an entry was never written (the file is then incomplete)."""
        if self._file is None:
            return
        file, self._file = self._file, None
        file.close()
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(f"{self.path.name}: {len(missing)} planned tensor(s) never written, e.g. {missing[0]!r}")
        actual = os.path.getsize(self.path)
        if actual != self.size:  # cannot happen unless the file was changed under us
            raise OSError(f"{self.path}: {actual} bytes written, expected {self.size}")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            file, self._file = self._file, None
            file.close(wait_errors=False)


def write_safetensors_streaming(
    path: Path | str,
    entries: Iterable[tuple[str, object, Sequence[int]]],
    tensors: Iterable[tuple[str, object]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `path` from `entries` (name, dtype, shape) and `tensors`, an iterable (say a generator)
    of (name, tensor) consumed one at a time; byte-identical to `save_file` of the same tensors.

    Written on the calling thread: a helper thread writing one tensor while the next is computed
    kept two tensors alive and gained nothing measurable on the 1.1B bench (the disk, not the
    arithmetic, sets the pace there).
    """
    with ShardWriter(path, entries, metadata) as writer:
        for name, tensor in tensors:
            writer.write(name, tensor)
            del tensor  # before the iterable computes the next one
