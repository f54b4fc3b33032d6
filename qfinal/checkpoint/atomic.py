"""Outputs appear complete or not at all: write beside the target, fsync, rename.

A later CI step must never mistake a half-written folder for a good one, so every file or folder
qfinal writes goes through one of these two context managers.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qfinal.checkpoint import interrupts
from qfinal.errors import OutputError


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath, name))
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """SIGTERM normally kills the process without unwinding; make it unwind so temp files go.

    Only where qfinal is a library: the `qfinal` process handles SIGTERM and SIGINT without
    unwinding (`interrupts`), which an exception raised at any bytecode cannot do safely."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if interrupts.active():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def refuse_existing(out: Path, force: bool) -> None:
    """Refuse an existing OUT without --force (all a dry run checks: it creates no folder)."""
    if Path(out).exists() and not force:
        raise OutputError(
            "output folder already exists", where=str(out), hint="choose another path or pass --force to replace it"
        )


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing OUT without --force, and a parent we cannot write, before any work starts."""
    out = Path(out)
    refuse_existing(out, force)
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise OutputError("parent is not a folder", where=str(parent), hint="choose another output path")
    try:
        with interrupts.critical():  # an interrupt removes the folders made here, if still empty
            missing = []
            for folder in (parent, *parent.parents):
                if folder.exists():
                    break
                missing.append(folder)
            parent.mkdir(parents=True, exist_ok=True)
            if missing:
                interrupts.on_interrupt(lambda: interrupts.remove_empty_folders(missing))
    except OSError as err:
        raise OutputError(
            f"cannot create the parent folder ({err.strerror})", where=str(parent), hint="choose a writable location"
        ) from None
    if not os.access(parent, os.W_OK):
        raise OutputError("parent folder is not writable", where=str(parent), hint="choose a writable location")


# Background fsyncs started by `sync_early`, per temporary folder; atomic_dir waits for them.
_EARLY_SYNCS: dict[Path, list] = {}
_SYNC_POOL = None


def sync_early(tmp: Path, path: Path) -> None:
    """Start flushing `path` (a finished file, or a folder of them, inside atomic_dir's `tmp`) to
    disk now, in a helper thread, so the flush overlaps the work still to come (the save round
    trip's comparisons). atomic_dir waits for it before the rename and re-raises
    its error: a failed writeback still fails the output."""
    global _SYNC_POOL
    from concurrent.futures import ThreadPoolExecutor

    if _SYNC_POOL is None:
        _SYNC_POOL = ThreadPoolExecutor(1, "qfinal-fsync")
    path = Path(path)
    job = _fsync_tree if path.is_dir() else _fsync_file
    _EARLY_SYNCS.setdefault(Path(tmp), []).append(_SYNC_POOL.submit(job, path))


def stop_sync_helper() -> None:
    """Join the flush helper thread (idle once every atomic_dir has waited for its flushes)."""
    global _SYNC_POOL
    if _SYNC_POOL is not None:
        pool, _SYNC_POOL = _SYNC_POOL, None
        pool.shutdown(wait=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _wait_early_syncs(tmp: Path, *, raise_errors: bool) -> None:
    for job in _EARLY_SYNCS.pop(tmp, []):
        error = job.exception()
        if error is not None and raise_errors:
            raise error


@contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A temporary folder (in `parent`, else the system's), removed on exit, on an interrupt too."""
    with interrupts.critical():
        area = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        token = interrupts.on_interrupt(lambda: interrupts.remove(area))
    try:
        yield area
    finally:
        with interrupts.critical():
            interrupts.remove(area)
            interrupts.forget(token)


@contextmanager
def atomic_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename."""
    out = Path(out)
    check_output_dir(out, force)
    with interrupts.critical():  # an interrupt from here on removes the folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qfinal-tmp-", dir=out.resolve().parent))
        undo = interrupts.on_interrupt(lambda: interrupts.remove(tmp))
    try:
        with _sigterm_as_exception():
            yield tmp
            _wait_early_syncs(tmp, raise_errors=True)
            _fsync_tree(tmp)  # what was not flushed early, and the folders; quick for flushed files
            with interrupts.critical():
                backup = None
                if out.exists():
                    backup = tmp.with_name(tmp.name + "-old")
                    os.rename(out, backup)
                os.rename(tmp, out)
                interrupts.forget(undo)
                keep_backup = interrupts.published(out, backup)  # the CLI: kept until it exits
            if backup is not None and not keep_backup:
                shutil.rmtree(backup, ignore_errors=True)
            _fsync_dir(out.resolve().parent)
    except BaseException as err:
        _wait_early_syncs(tmp, raise_errors=False)
        with interrupts.critical():
            shutil.rmtree(tmp, ignore_errors=True)
            interrupts.forget(undo)
        failed = _write_failure(err)
        if failed:
            raise OutputError(
                f"cannot write the output: {failed[0]}; nothing was written", where=str(out), hint=failed[1]
            ) from None
        raise


# The destination cannot take the output: full, read-only, or failing. Not qfinal's fault, so
# one line and exit 2 rather than a traceback.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_WRITE_ERRNOS = _FULL_ERRNOS | {errno.EIO}


def _write_failure(err: BaseException) -> tuple[str, str] | None:
    """(the OS's words, what to do) when `err` means the destination failed the write, else None.

    safetensors reports write failures as SafetensorError('... I/O error: <strerror> (os error N)').
    """
    code, words = None, None
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        code, words = err.errno, err.strerror or os.strerror(err.errno)
    elif type(err).__name__ == "SafetensorError":
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(err))
        if found and int(found.group(2)) in _WRITE_ERRNOS:
            code, words = int(found.group(2)), found.group(1)
    if code is None:
        return None
    if code in _FULL_ERRNOS:
        return words, "free some space or choose another location"
    return words, "the disk or filesystem reported an error: check it, or choose another location"


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path`; it is renamed onto `path` only if the block succeeds.

    A destination that exists and is not a regular file (/dev/null, /dev/stdout, a FIFO) is written
    in place: renaming onto it would replace the device node itself."""
    path = Path(path)
    if path.exists() and not path.is_file():
        if path.is_dir():
            raise OutputError("is a folder, not a file", where=str(path), hint="name a file")
        with open(path, mode) as fh:
            yield fh
        return
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputError("folder does not exist", where=str(parent), hint="create it first")
    with interrupts.critical():  # an interrupt from here on removes the file
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        undo = interrupts.on_interrupt(lambda: interrupts.remove(Path(tmp)))
    try:
        with _sigterm_as_exception(), os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with interrupts.critical():
            backup = _kept_aside(path, tmp) if interrupts.active() else None
            os.replace(tmp, path)
            interrupts.forget(undo)
            interrupts.published(path, backup)
    except BaseException as err:
        with interrupts.critical():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            interrupts.forget(undo)
        failed = _write_failure(err)
        if failed:  # as atomic_dir does: the destination's fault, not a qfinal bug
            raise OutputError(
                f"cannot write the file: {failed[0]}; any previous file is unchanged", where=str(path), hint=failed[1]
            ) from None
        raise


def _kept_aside(path: Path, tmp: str) -> Path | None:
    """A copy of the file `path` that the CLI puts back if it is interrupted before it exits (a
    hard link where it can); None when there is none to keep (an interrupt only removes the new file)."""
    if not os.path.lexists(path):
        return None
    backup = Path(f"{tmp}-old")
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        try:
            shutil.copy2(path, backup, follow_symlinks=False)
        except OSError:
            return None
    return backup


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)
