"""Issue 7: outputs are atomic. An interrupted `qfinal save` / `qfinal dequantize` leaves no OUT
(or the old OUT, untouched, under --force) and no `.OUT.qfinal-tmp-*` folder.

Subprocess cases send a real SIGINT / SIGTERM. To interrupt mid-write deterministically the child
is a small wrapper around `qfinal.cli.app.main` whose safetensors writers (`save_file`, used by save,
and qfinal's streaming shard writer, used by dequantize) write the first file, then signal
readiness through a file and sleep; the test sends the signal only once that first
file sits in the temp folder beside OUT. In-process cases raise from the same place instead.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import builders
import pytest
import safetensors.torch
from safetensors import SafetensorError

WRAPPER = textwrap.dedent('''
    """qfinal with a slow writer: after the first weight file, say so and sleep."""
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    import safetensors.torch

    import qfinal.checkpoint.writer

    def _ready_then_sleep(filename):
        Path(os.environ["QFINAL_TEST_READY"]).write_text(str(filename))
        time.sleep(120)

    _real_save_file = safetensors.torch.save_file
    _real_mapped = qfinal.checkpoint.writer.save_file_mapped
    _real_streaming = qfinal.checkpoint.writer.write_safetensors_streaming

    def _slow_save_file(tensors, filename, *args, **kwargs):
        _real_save_file(tensors, filename, *args, **kwargs)
        _ready_then_sleep(filename)

    def _slow_mapped(tensors, filename, *args, **kwargs):
        _real_mapped(tensors, filename, *args, **kwargs)
        _ready_then_sleep(filename)

    def _slow_streaming(path, *args, **kwargs):
        _real_streaming(path, *args, **kwargs)
        _ready_then_sleep(path)

    # Before transformers is imported: modeling_utils binds `save_file` at import time.
    safetensors.torch.save_file = _slow_save_file
    qfinal.checkpoint.writer.write_safetensors_streaming = _slow_streaming
    qfinal.checkpoint.writer.save_file_mapped = _slow_mapped  # before qfinal.ops.save binds it
    # Ctrl-C semantics even when the test runner started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from qfinal.cli.app import console

    sys.argv[0] = "qfinal"
    console()  # the console script's entry: SIGINT / SIGTERM handled by qfinal.checkpoint.interrupts
''')

START_TIMEOUT = 90  # importing torch + transformers and loading the model, on 2 busy cores
EXIT_TIMEOUT = 30


def temp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.qfinal-tmp-*"))


def argv_for(command: str, checkpoints, out: Path) -> list[str]:
    if command == "save":
        return ["save", str(checkpoints["llama_untied"]), str(out), "--max-shard-size", "100KB", "--quiet"]
    return [
        "dequantize",
        str(checkpoints.quantized("llama_untied", "nf4")),
        str(out),
        "--max-shard-size",
        "40KB",
        "--quiet",
    ]


def previous_out(out: Path) -> Path:
    out.mkdir()
    (out / "previous.txt").write_text("the last good run")
    return out


def assert_previous_out_intact(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert (out / "previous.txt").read_text() == "the last good run"


# ----------------------------------------------------------------------------- real signals


def run_and_interrupt(argv: list[str], out: Path, tmp_path: Path, signum: int) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "slow_qfinal.py"
    wrapper.write_text(WRAPPER)
    ready = tmp_path / "ready"
    env = dict(os.environ, QFINAL_TEST_READY=str(ready), PYTHONUNBUFFERED="1")
    env.pop("QFINAL_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), *argv],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                stdout, stderr = proc.communicate()
                pytest.fail(f"qfinal exited {proc.returncode} before writing anything:\n{stderr}\n{stdout}")
            if time.monotonic() > deadline:
                pytest.fail("qfinal did not reach its first output file in time")
            time.sleep(0.05)
        # Mid-write: the first weight file is in the temp folder beside OUT, OUT itself is absent.
        written = Path(ready.read_text())
        (tmp,) = temp_dirs(out)
        assert written.parent == tmp and written.is_file()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=EXIT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["save", "dequantize"])
def test_signal_mid_write_leaves_nothing(checkpoints, tmp_path, command, signum):
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    done = run_and_interrupt(argv_for(command, checkpoints, out), out, tmp_path, signum)
    # 130 for both. A negative code would mean the process died without cleaning up.
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not out.exists()
    assert temp_dirs(out) == []
    assert list(out.parent.iterdir()) == []


def test_signal_mid_write_keeps_previous_out_under_force(checkpoints, tmp_path):
    out = previous_out(tmp_path / "out")
    done = run_and_interrupt(argv_for("save", checkpoints, out) + ["--force"], out, tmp_path, signal.SIGINT)
    assert done.returncode == 130, done.stderr
    assert_previous_out_intact(out)
    assert temp_dirs(out) == []


def test_interrupt_is_reported(checkpoints, tmp_path):
    out = tmp_path / "out"
    done = run_and_interrupt(argv_for("dequantize", checkpoints, out), out, tmp_path, signal.SIGINT)
    assert done.returncode == 130
    assert "interrupted" in done.stderr


# ----------------------------------------------------------------------------- in-process failures


@pytest.fixture
def fail_after_first_file(monkeypatch):
    """Make every safetensors writer qfinal reaches write one file, then raise `exc`."""
    import transformers.modeling_utils as modeling_utils

    import qfinal.checkpoint.writer
    import qfinal.ops.save

    def install(exc: BaseException) -> list[Path]:
        real_save_file = safetensors.torch.save_file
        real_mapped = qfinal.checkpoint.writer.save_file_mapped
        real_streaming = qfinal.checkpoint.writer.write_safetensors_streaming
        written: list[Path] = []

        def save_file(tensors, filename, *args, **kwargs):
            if written:
                raise exc
            real_save_file(tensors, filename, *args, **kwargs)
            written.append(Path(filename))

        def save_file_mapped(tensors, filename, *args, **kwargs):
            if written:
                raise exc
            real_mapped(tensors, filename, *args, **kwargs)
            written.append(Path(filename))

        def write_safetensors_streaming(path, *args, **kwargs):
            if written:
                raise exc
            real_streaming(path, *args, **kwargs)
            written.append(Path(path))

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
        monkeypatch.setattr(qfinal.checkpoint.writer, "save_file_mapped", save_file_mapped)  # write_state_dict's
        monkeypatch.setattr(qfinal.ops.save, "save_file_mapped", save_file_mapped)  # save_pretrained's
        monkeypatch.setattr(qfinal.checkpoint.writer, "write_safetensors_streaming", write_safetensors_streaming)
        return written

    return install


@pytest.mark.parametrize("force", [False, True], ids=["new_out", "force_over_old_out"])
@pytest.mark.parametrize("command", ["save", "dequantize"])
def test_exception_mid_write_leaves_nothing(checkpoints, tmp_path, capsys, fail_after_first_file, command, force):
    out = tmp_path / "out"
    argv = argv_for(command, checkpoints, out)
    if force:
        previous_out(out)
        argv.append("--force")
    written = fail_after_first_file(RuntimeError("simulated crash mid-write"))
    sigterm_before = signal.getsignal(signal.SIGTERM)
    code, _out, err = builders.run_cli(capsys, *argv)
    assert len(written) == 1 and written[0].parent.name.startswith(".out.qfinal-tmp-")
    assert code == 70 and "simulated crash mid-write" in err  # not a user error: a bug, with traceback
    if force:
        assert_previous_out_intact(out)
    else:
        assert not out.exists()
    assert temp_dirs(out) == []
    assert signal.getsignal(signal.SIGTERM) is sigterm_before  # the atomic block's handler is gone


@pytest.mark.parametrize("command", ["save", "dequantize"])
def test_keyboard_interrupt_mid_write_leaves_nothing(checkpoints, tmp_path, capsys, fail_after_first_file, command):
    out = tmp_path / "out"
    written = fail_after_first_file(KeyboardInterrupt())
    code, _out, err = builders.run_cli(capsys, *argv_for(command, checkpoints, out))
    assert len(written) == 1
    assert code == 130 and "Traceback" not in err
    assert not out.exists() and temp_dirs(out) == []


DISK_FULL = {
    # What safetensors 0.8 raises when the disk fills under it (seen on a 64 KB tmpfs), and the
    # OSError that plain file writes (config.json, index, torch.save) raise.
    "safetensors": lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "oserror": lambda: OSError(errno.ENOSPC, "No space left on device"),
    # A failing disk: the destination's fault too, so one line and exit 2, not a traceback.
    "eio-safetensors": lambda: SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)"),
    "eio": lambda: OSError(errno.EIO, "Input/output error"),
}


@pytest.mark.parametrize("error", sorted(DISK_FULL))
@pytest.mark.parametrize("command", ["save", "dequantize"])
def test_disk_full_mid_write_is_a_clean_error(checkpoints, tmp_path, capsys, fail_after_first_file, command, error):
    out = tmp_path / "out"
    fail_after_first_file(DISK_FULL[error]())
    code, _out, err = builders.run_cli(capsys, *argv_for(command, checkpoints, out))
    assert not out.exists() and temp_dirs(out) == []
    assert code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert str(out) in line and ("Input/output error" if "eio" in error else "No space left") in line


def test_disk_full_cleans_up(checkpoints, tmp_path, capsys, fail_after_first_file):
    """Whatever the exit code, a full disk leaves no partial OUT and no temp folder."""
    out = tmp_path / "out"
    fail_after_first_file(DISK_FULL["safetensors"]())
    code, _out, _err = builders.run_cli(capsys, *argv_for("dequantize", checkpoints, out))
    assert code != 0
    assert not out.exists() and temp_dirs(out) == []


def test_report_json_is_written_atomically(checkpoints, tmp_path, capsys, monkeypatch):
    """--json FILE: a failure while writing the report keeps the old file and leaves no temp file."""
    import qfinal.checkpoint.atomic

    report_path = tmp_path / "report.json"
    report_path.write_text('{"previous": true}')

    def fsync(fd):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(qfinal.checkpoint.atomic.os, "fsync", fsync)
    code, _out, _err = builders.run_cli(
        capsys, "validate", str(checkpoints["llama_untied"]), "--fast", "--json", str(report_path)
    )
    assert code != 0
    assert json.loads(report_path.read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# ----------------------------------------------------------------------------- qfinal.interrupts

SIGNAL_CHILD = textwrap.dedent('''
    """An atomic write interrupted where unwinding could not work; argv: OUT CASE SIGNUM."""
    import _imp
    import os
    import signal
    import sys
    import threading
    import time
    from pathlib import Path

    from qfinal.checkpoint import interrupts
    from qfinal.checkpoint.atomic import atomic_dir, write_text_atomic

    out, case, signum = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    interrupts.install()
    if case == "import_lock":
        # What a KeyboardInterrupt cut into importlib left behind: the main thread keeps the
        # global import lock, so a helper thread that imports never ends, and joining it hangs.
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 100)
            _imp.acquire_lock()
            helper = threading.Thread(target=lambda: __import__("xml.dom.minidom"))
            helper.start()
            os.kill(os.getpid(), signum)
            helper.join()
    elif case == "main_thread_waiting":
        # The signal cannot reach the main thread (it blocks it, as a long C call would delay it):
        # the watchdog thread acts.
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 100)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            os.kill(os.getpid(), signum)
            threading.Event().wait(60)
    elif case in ("published", "published_force"):
        with atomic_dir(out, force=case == "published_force") as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
        write_text_atomic(out.with_name("report.html"), "new")
        os.kill(os.getpid(), signum)
        time.sleep(60)
    elif case == "finished":
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
        interrupts.finish(0)
        os.kill(os.getpid(), signum)
        time.sleep(60)
    sys.exit(3)
''')


def run_signal_child(tmp_path: Path, out: Path, case: str, signum: int) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "child.py"
    script.write_text(SIGNAL_CHILD)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), str(out), case, str(int(signum))],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return done, time.monotonic() - start


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("case", ["import_lock", "main_thread_waiting"])
def test_signal_exits_130_without_unwinding(tmp_path, case, signum):
    """Issue: a SIGTERM right after the temp folder appeared hung `qfinal save` (the probe thread
    waited for an import lock the interrupted main thread kept, and the main thread joined it)."""
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    done, took = run_signal_child(tmp_path, out, case, signum)
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert took < 10
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_after_publishing_undoes_it(tmp_path, signum):
    """Interrupted before it exits, the command leaves nothing it published."""
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    done, _took = run_signal_child(tmp_path, out, "published", signum)
    assert done.returncode == 130, done.stderr
    assert list(out.parent.iterdir()) == []


def test_signal_after_publishing_puts_back_what_force_replaced(tmp_path):
    (tmp_path / "outputs").mkdir()
    out = previous_out(tmp_path / "outputs" / "out")
    (out.parent / "report.html").write_text("old")
    done, _took = run_signal_child(tmp_path, out, "published_force", signal.SIGTERM)
    assert done.returncode == 130, done.stderr
    assert_previous_out_intact(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "report.html"]
    assert (out.parent / "report.html").read_text() == "old"


def test_signal_after_finish_keeps_the_output(tmp_path):
    """Once the command is over, a signal ends the process with the command's own code."""
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    done, _took = run_signal_child(tmp_path, out, "finished", signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_report_to_a_device_or_fifo_writes_in_place_and_keeps_the_node(checkpoints, tmp_path, capsys):
    """`--json /dev/null` (or a FIFO a CI step reads) is written in place: the rename that makes a
    file output atomic would replace the device node itself with a regular file."""
    import stat
    import threading

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received = {}

    def read() -> None:
        with open(fifo) as fh:
            received["text"] = fh.read()

    reader = threading.Thread(target=read, daemon=True)  # blocks in open() for good if nothing writes
    reader.start()
    code, _out, err = builders.run_cli(capsys, "validate", checkpoints["llama_tied"], "--fast", "--json", fifo)
    reader.join(timeout=60)
    assert code == 0, err
    assert not reader.is_alive(), "nothing read the report from the FIFO"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert json.loads(received["text"])["command"].startswith("validate")
    code, _out, err = builders.run_cli(capsys, "validate", checkpoints["llama_tied"], "--fast", "--json", "/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
