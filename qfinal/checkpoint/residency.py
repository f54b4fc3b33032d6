"""Tensors that are still their checkpoint file's bytes, and reading them without paging them in.

transformers loads a safetensors shard by mapping it privately: each tensor is a view of the
mapping, and only the pages something reads become resident (counted in the process's RSS).
A NaN scan that reads every tensor through the mapping makes all of them resident, although the
forward pass may never read most of a large embedding (32 tokens read 32 of its 32,000 rows).

The kernel can say, page by page (/proc/self/pagemap), whether a private mapping's page was ever
written (it then holds a private anonymous copy). A tensor none of whose pages was written holds
exactly the file's bytes, so a scan can read them from the file, through the page cache, which is
not the process's memory. Linux only; everywhere else (and for any tensor this cannot prove) the
caller reads the tensor itself.
"""

from __future__ import annotations

import bisect
import os
import sys

_PRESENT, _SWAPPED, _FILE_PAGE = 63, 62, 61  # pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)


class FileViews:
    """The process's file mappings, read once; `file_view(tensor)` is valid until the mappings
    change (use one instance per scan)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[tuple[int, int, int, str, tuple[int, int, int]]] = []
        self._pagemap: int | None = None
        self._files: dict[str, int] = {}
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        if not sys.platform.startswith("linux"):
            return
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                lines = fh.readlines()
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError:
            self._pagemap = None
            return
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            path = fields[5].rstrip("\n")
            if path.endswith(" (deleted)") or fields[1][3] != "p":  # private mappings only
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            self._maps.append((start, end, int(fields[2], 16), path, (major, minor, int(fields[4]))))
        self._maps.sort()
        self._starts = [m[0] for m in self._maps]

    def close(self) -> None:
        for fd in [self._pagemap, *self._files.values()]:
            if fd is not None:
                os.close(fd)
        self._pagemap, self._files = None, {}

    def __enter__(self) -> "FileViews":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _mapping(self, tensor, *, unless_resident: bool = False):
        """(mapping, offset of the tensor in its file) for a never-written view; else None (also
        when `unless_resident` and every page is already in memory). One pagemap read."""
        if self._pagemap is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        nbytes = tensor.numel() * tensor.element_size()
        ptr = tensor.data_ptr()
        if nbytes == 0:
            return None
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        mapping = self._maps[i]
        start, end, offset = mapping[:3]
        if ptr + nbytes > end:
            return None
        entries = self._entries(ptr, nbytes)
        if entries is None or not self._never_written(entries):
            return None
        if unless_resident and bool(self._bit(entries, _PRESENT).all()):
            return None
        return mapping, offset + (ptr - start)

    def locate(self, tensor) -> tuple[tuple[int, int, int], int, int, str, tuple] | None:
        """Where `tensor`'s bytes are, for a never-written view: (file identity (device major,
        minor, inode), offset, byte count, dtype, shape). Two tensors with the same location hold
        the same bytes without either being read: both are that file's bytes."""
        found = self._mapping(tensor)
        if found is None:
            return None
        (_s, _e, _o, _path, identity), offset = found
        return identity, offset, tensor.numel() * tensor.element_size(), str(tensor.dtype), tuple(tensor.shape)

    def file_view(self, tensor, *, unless_resident: bool = False) -> tuple[int, int] | None:
        """(open file descriptor, offset) of `tensor`'s bytes in the file it is a never-written view
        of; None when it is not one (or this cannot be proven), and with `unless_resident` when
        every page of it is in memory already (reading it there then costs no RSS)."""
        found = self._mapping(tensor, unless_resident=unless_resident)
        if found is None:
            return None
        (_s, _e, _o, path, identity), file_offset = found
        fd = self._files.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return None
            st = os.fstat(fd)
            if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) != identity:
                os.close(fd)  # the path now names another file than the one mapped: replaced
                return None
            self._files[path] = fd
        return fd, file_offset

    def _entries(self, ptr: int, nbytes: int):
        """The pagemap entries (int64) of the pages spanning [ptr, ptr + nbytes); None if unreadable."""
        import torch

        first, last = ptr // self.page, (ptr + max(nbytes, 1) - 1) // self.page
        count = last - first + 1
        try:
            raw = os.pread(self._pagemap, 8 * count, 8 * first)
        except OSError:
            return None
        if len(raw) != 8 * count:
            return None
        return torch.frombuffer(bytearray(raw), dtype=torch.int64)

    @staticmethod
    def _bit(entries, bit: int):
        return ((entries >> bit) & 1).bool()  # bit 63 included: >> on int64 keeps the sign, & 1 drops it

    def _never_written(self, entries) -> bool:
        present, file_page = self._bit(entries, _PRESENT), self._bit(entries, _FILE_PAGE)
        written = (present & ~file_page) | self._bit(entries, _SWAPPED)  # a private copy, in memory or swap
        return not bool(written.any())

    def resident_pages(self, tensor) -> tuple[int, int]:
        """(pages of `tensor` in the process's memory, pages it spans); (0, 0) when unknown."""
        if self._pagemap is None:
            return 0, 0
        entries = self._entries(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if entries is None:
            return 0, 0
        return int(self._bit(entries, _PRESENT).sum()), entries.numel()

    def all_resident(self, tensor) -> bool:
        """Every page of `tensor` is already in the process's memory (reading it there costs no RSS)."""
        present, total = self.resident_pages(tensor)
        return total > 0 and present == total


def read_chunks(fd: int, offset: int, nbytes: int, buffer: bytearray):
    """Yield memoryviews of `nbytes` at `offset` in `fd`, `len(buffer)` at a time, read into `buffer`
    (reused: each view is valid until the next one)."""
    view = memoryview(buffer)
    done = 0
    while done < nbytes:
        want = min(len(buffer), nbytes - done)
        filled = 0
        while filled < want:  # a chunk is whole, so it never splits an element
            got = os.preadv(fd, [view[filled:want]], offset + done + filled)
            if got <= 0:
                raise OSError(f"file ended at offset {offset + done + filled}, {nbytes - done - filled} bytes short")
            filled += got
        yield view[:want]
        done += want
