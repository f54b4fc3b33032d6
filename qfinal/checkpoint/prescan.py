"""The NaN/Inf scan of a plain load, done from the checkpoint files on the idle core during import.

Importing torch and transformers takes seconds of one core, and the other is idle. For a plain
load (no quantization, no dequantization, everything on the CPU) transformers maps each shard and
the finalized tensors are views of the file, so the bytes the nan_inf check reads after loading
are known before torch is imported. This thread reads them from the files (through the page cache,
so not into the process's memory) while the main thread imports; the validate stage then asks,
for each tensor that `residency.FileViews` proves is a never-written view of a file, whether the
file bytes it spans were scanned clean, and reads only the rest itself.

A result is trusted only for the same file, unchanged: device, inode, size, mtime and ctime equal
before the scan and at the check, and the file last changed at least `RACY_SECONDS` before the scan
began (a write within one timestamp tick of the first stat would leave mtime and ctime equal), and
its header, read again after that first stat, giving each entry the offsets the scan used. Not
covered: a process writing through a shared mapping of a page that is already dirty, which the
kernel does not stamp; a tool that trusts file timestamps cannot see that. Where the mapping's
device numbers differ from stat's (btrfs subvolumes, overlayfs) nothing matches and validate
scans every tensor itself, as without the prescan.

The test is on the bits, two integer max reductions per run of same-dtype bytes and no temporary:
a float is NaN or Inf exactly when its exponent bits are all ones, i.e. as a signed integer it is at
least the +Inf pattern, or as an unsigned integer at least the -Inf pattern.

The bytes are read through a read-only mapping of one window of the file at a time, unmapped before
the next: no copy (a `pread` into a buffer streams every byte through memory twice more, on the
thread that competes with the import: bench/README, the `prescan` line), and the window bounds
what the scan adds to the process's RSS. Like the loader's own mapping, a file
truncated underneath it ends the process with SIGBUS.
"""

from __future__ import annotations

import bisect
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from qfinal.checkpoint.dtypes import NAN_SCAN, element_size, torch_name

RACY_SECONDS = 1.0
JOIN_SECONDS = 30.0  # how long validate waits for the thread to finish its current read
WINDOW_BYTES = 64 << 20  # one mapping at a time: what the scan adds to RSS, at most


def _file_state(st: os.stat_result) -> tuple:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class _Scanned:
    """One file's scanned entries: sorted absolute (start, end, safetensors dtype code, clean)."""

    fd: int
    state: tuple
    starts: list[int] = field(default_factory=list)
    spans: list[tuple[int, int, str, bool]] = field(default_factory=list)


def eligible(config) -> bool:
    """A load whose finalized tensors can be file views, checked for NaN, on a machine with a core to spare."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    v = config.validate_
    return (
        cores >= 2
        and v.enabled
        and v.check_nan
        and config.quantize.method == "none"
        and not config.dequantize
        and config.device_map == "cpu"
        and config.stop_after in (None, "validate")
    )


class Prescan:
    """A background scan of a checkpoint folder's float tensors. `clean(location)` answers for one
    tensor once `stop()` has been called; `close()` releases the files."""

    def __init__(self, source, allow_pickle: bool = False) -> None:
        self._source, self._allow_pickle = source, allow_pickle
        self._stop = threading.Event()
        self._files: dict[tuple[int, int, int], _Scanned] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._timed_out = False
        self.error: BaseException | None = None
        self.scanned_bytes = 0
        self._thread = threading.Thread(target=self._run, name="qfinal-prescan", daemon=True)

    def start(self) -> "Prescan":
        self._thread.start()  # run_pipeline goes on without a prescan if this raises
        return self

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._scan_folder()
        except BaseException as err:  # never let the helper break a load: validate scans itself
            self.error = err

    def _scan_folder(self) -> None:
        from qfinal.checkpoint.inventory import inspect_checkpoint

        inv = inspect_checkpoint(
            self._source.folder, allow_pickle=self._allow_pickle, confine_to=self._source.confine_to
        )
        if not inv.ok or inv.format != "safetensors":
            return
        by_file: dict[str, list] = {}
        for entry in inv.tensors.values():
            if entry.dtype in NAN_SCAN and entry.end > entry.start:
                by_file.setdefault(entry.file, []).append(entry)
        import numpy as np

        for name, entries in by_file.items():
            if self._stop.is_set():
                return
            self._scan_file(np, inv.root / name, sorted(entries, key=lambda e: e.start))

    def _scan_file(self, np, path, entries) -> None:
        began = time.time_ns()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        keep = False
        try:
            st = os.fstat(fd)
            state = _file_state(st)
            racy = began - RACY_SECONDS * 1e9
            if st.st_mtime_ns > racy or st.st_ctime_ns > racy:
                return
            base = self._same_layout(fd, st.st_size, entries)
            if base is None:
                return  # the header read earlier is not this file's now: nothing is trusted
            scanned = _Scanned(fd, state)
            for entry in entries:
                if self._stop.is_set():
                    break
                start, end = base + entry.start, base + entry.end
                clean = self._clean_range(np, fd, start, end, entry.dtype)
                if clean is None:
                    break
                scanned.spans.append((start, end, entry.dtype, clean))
                self.scanned_bytes += end - start
            if _file_state(os.fstat(fd)) != state:
                return  # changed while scanning: nothing of it is trusted
            scanned.starts = [s[0] for s in scanned.spans]
            with self._lock:
                if self._closed:
                    return
                previous = self._files.get(state[:3])
                if previous is not None:  # the same inode under two names: keep one descriptor
                    os.close(previous.fd)
                self._files[state[:3]] = scanned
            keep = True
        finally:
            if not keep:
                os.close(fd)

    @staticmethod
    def _same_layout(fd: int, size: int, entries) -> int | None:
        """The data section's start, read from `fd` after the baseline stat, when this header gives
        every entry the dtype and offsets the inventory read earlier; else None."""
        import json

        try:
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            if n <= 0 or 8 + n > size:
                return None
            doc = json.loads(os.pread(fd, n, 8))
            for entry in entries:
                info = doc[entry.name]
                if info["dtype"] != entry.dtype or list(info["data_offsets"]) != [entry.start, entry.end]:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return 8 + n

    def _clean_range(self, np, fd: int, start: int, end: int, dtype: str, window: int = WINDOW_BYTES) -> bool | None:
        """True when no element of [start, end) is NaN or Inf; None when stopped or unreadable.
        `window` (a multiple of the mapping granularity) is how much of the file is mapped at once;
        an element cut by a window's end is read whole from the next one."""
        signed, unsigned, pos_inf, neg_inf = NAN_SCAN[dtype]
        width = np.dtype(signed).itemsize
        offset = start
        while offset < end:
            if self._stop.is_set():
                return None
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            length = min(end, max(base + window, offset + width)) - base  # at least one element
            count = (length - (offset - base)) // width
            try:
                mapped = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=base)
            except (OSError, ValueError):
                return None
            try:
                values = np.frombuffer(mapped, dtype=signed, count=count, offset=offset - base)
                bad = bool(values.max() >= pos_inf or values.view(unsigned).max() >= neg_inf)
                del values  # the mapping cannot close while an array still exports it
            finally:
                mapped.close()
            if bad:
                return False
            offset += count * width
        return True

    # ------------------------------------------------------------------ the validate side

    def stop(self) -> None:
        """Stop scanning (what is done stays usable) and wait for the thread, up to JOIN_SECONDS:
        a read that hangs (a stuck network file system) then only means no result is used."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(JOIN_SECONDS)
            if self._thread.is_alive():
                with self._lock:
                    self._timed_out = True

    def clean(self, location) -> bool:
        """Whether a tensor at `location` (`FileViews.locate`: identity, offset, bytes, dtype, shape)
        lies inside one scanned-clean entry of the same dtype of a file that has not changed since."""
        identity, offset, nbytes, dtype, _shape = location
        with self._lock:
            scanned = None if self._timed_out else self._files.get(tuple(identity))
        if scanned is None:
            return False
        i = bisect.bisect_right(scanned.starts, offset) - 1
        if i < 0:
            return False
        start, end, code, clean = scanned.spans[i]
        if not (
            clean
            and torch_name(code) == dtype
            and start <= offset
            and offset + nbytes <= end
            and (offset - start) % element_size(code) == 0
        ):
            return False
        try:
            return _file_state(os.fstat(scanned.fd)) == scanned.state
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            with self._lock:
                self._closed = True
                for scanned in self._files.values():
                    os.close(scanned.fd)
                self._files = {}


def start_for(ctx) -> Prescan | None:
    """A running prescan for this context's load, or None when it cannot help."""
    if not eligible(ctx.config):
        return None
    return Prescan(ctx.source, ctx.allow_pickle).start()
