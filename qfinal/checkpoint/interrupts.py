"""SIGINT / SIGTERM in the `qfinal` process: undo what this run wrote, say so, exit 130. Never unwind.

Raising KeyboardInterrupt from a signal handler (Python's default for SIGINT, and what atomic_dir
used to do for SIGTERM) interrupts whatever bytecode the main thread runs, library code included,
and not all of it survives that:

* importlib: `_ImportLockContext.__enter__` acquires the global import lock and is cut before
  `__exit__` is armed (accelerate's `is_deepspeed_available()` runs `find_spec` in every
  `save_pretrained`). The main thread keeps the lock, so every other thread that imports blocks
  for good: `qfinal save`'s probe thread, which the main thread then joins (or the interpreter
  does at exit). The process hung with its temporary folder in place.
* torch's C++ import of numpy swallows any exception, KeyboardInterrupt included: the command went
  on, with numpy half imported, and published its output (exit 0), or failed later (exit 2, 70).

So in the CLI process a signal never becomes an exception. The handler, on the main thread between
two bytecodes, runs the undo actions registered by the atomic writers (remove a temporary folder or
file; un-publish an output and put back the one it replaced), writes one line and calls
`os._exit(130)`. Where the main thread sits in a long C call or a wait that the signal does not
break, a watchdog thread woken through `signal.set_wakeup_fd` does the same after `GRACE_SECONDS`.

Registering an undo action and the step it undoes (creating the temporary folder, the renames that
publish it) happen together inside `critical()`: a signal that arrives meanwhile is acted on when
the section ends. Until `finish(code)` (the CLI's last step) a published output is undone too, and
an output it replaced is kept aside to be put back: "interrupted" always means "as if never run".
After `finish`, a signal ends the process at once with `code`.

Without `install()` (qfinal used as a library, the in-process tests) nothing here acts: outputs
publish as before, and atomic_dir turns SIGTERM into KeyboardInterrupt as before.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

EXIT_INTERRUPTED = 130
GRACE_SECONDS = 2.0  # how long the watchdog leaves the main thread to act on a signal itself
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()  # the undo list, against the watchdog and other threads' atomic writers
_undo: dict[int, Callable[[], None]] = {}  # token -> action, run newest first
_after: list[Callable[[], None]] = []  # run by finish(): drop the outputs kept aside for undo
_tokens = itertools.count()
_installed = False
_depth = 0  # the main thread is inside critical()
_pending: int | None = None  # a signal that arrived meanwhile
_exiting = False
_final_code: int | None = None


def active() -> bool:
    """Whether the CLI's handlers are in charge (in `qfinal` itself, not in a library caller)."""
    return _installed


def install() -> None:
    """Handle SIGINT and SIGTERM for the rest of the process (main thread; idempotent). A signal the
    process was started with ignored (`nohup`, a background job) stays ignored."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    _installed = True
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (OSError, ValueError):
        return
    threading.Thread(target=_watchdog, args=(read_fd,), name="qfinal-signals", daemon=True).start()


@contextmanager
def critical() -> Iterator[None]:
    """A step and the registration of its undo action, which a signal must not separate."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        with _lock:
            yield
        return
    _depth += 1
    try:
        if _depth == 1:
            with _lock:
                yield
        else:  # nested: the lock is held already
            yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            _interrupt(_pending)


def on_interrupt(action: Callable[[], None]) -> int:
    """Run `action` if the process is interrupted; call inside `critical()`. Returns a token for
    `forget`. Nothing is kept where the CLI's handlers are not installed."""
    token = next(_tokens)
    if _installed:
        _undo[token] = action
    return token


def forget(token: int) -> None:
    """Inside `critical()`: the action registered under `token` is no longer needed."""
    _undo.pop(token, None)


def published(out: Path, previous: Path | None) -> bool:
    """Inside `critical()`, right after `out` was renamed into place, `previous` (if any) being the
    output it replaced, moved aside. With the CLI's handlers: an interrupt before `finish` removes
    `out` and puts `previous` back; `finish` removes `previous`. Returns whether `previous` was
    kept for that (else the caller removes it now)."""
    if not _installed:
        return False

    def undo() -> None:
        remove(out)
        if previous is not None:
            os.rename(previous, out)

    on_interrupt(undo)
    if previous is not None:
        _after.append(lambda: remove(previous))
    return True


def finish(code: int) -> None:
    """The command is over and the process ends with `code`: what it published stays, the outputs
    it replaced go; a signal from now on ends the process at once with `code`."""
    global _final_code
    if not _installed:
        return
    with critical():
        _final_code = code
        _undo.clear()
        while _after:
            _after.pop()()


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: the parents this run created."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def remove(path: Path) -> None:
    """Remove a file or folder this process made. A folder is renamed aside first: nothing can be
    created in it by path while it goes, and a half-removed folder never keeps its name."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            gone = path.with_name(path.name + "-x")
            try:
                os.rename(path, gone)
            except OSError:
                gone = path
            for _ in range(3):
                shutil.rmtree(gone, ignore_errors=True)
                if not os.path.lexists(gone):
                    break
        else:
            os.unlink(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- acting on a signal


def _on_signal(signum, frame) -> None:
    global _pending
    if _depth:  # the main thread is between a step and its undo registration: finish it first
        _pending = _pending or signum
        return
    _interrupt(signum)


def _interrupt(signum: int, *, watchdog: bool = False) -> None:
    global _exiting
    if watchdog:
        # the main thread may be undoing already (a large folder): then wait for it to exit
        if not _lock.acquire(timeout=GRACE_SECONDS) and _exiting:
            _lock.acquire()
    else:
        if _exiting:  # a second signal while this thread undoes
            return
        _lock.acquire()
    _exiting = True
    if _final_code is not None:
        code, line = _final_code, b""
    else:
        code, line = EXIT_INTERRUPTED, b"qfinal: interrupted; nothing was left half-written\n"
        for token in sorted(_undo, reverse=True):
            try:
                _undo[token]()
            except Exception:
                pass
    if line:
        try:
            if os.isatty(2):  # a progress bar (rich) may be drawn, with the cursor hidden
                line = b"\r\x1b[2K\x1b[?25h" + line
            os.write(2, line)  # not sys.stderr: the main thread may be inside a write to it
        except OSError:
            pass
    os._exit(code)


def _watchdog(read_fd: int) -> None:
    """Woken by every signal (the C handler writes its number to the wakeup fd, whichever thread
    it interrupted); acts itself if the main thread has not within GRACE_SECONDS."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if any(b in _SIGNALS for b in data):
            time.sleep(GRACE_SECONDS)
            _interrupt(next(b for b in data if b in _SIGNALS), watchdog=True)
