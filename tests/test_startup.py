"""Lazy start-up: help, version and argument errors never import the heavy libraries.

Each case runs the CLI's `main()` in a fresh interpreter, catches its SystemExit, and reports the
exit code and which of torch / transformers / bitsandbytes / peft / accelerate ended up in
`sys.modules`. Nothing here is timed: how fast `qfinal --help` is belongs to bench/run.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "accelerate")
MARK = "@@qfinal-startup@@ "

CHILD = f"""
import json, sys
HEAVY = {HEAVY!r}
code = 0
try:
    if sys.argv[1] == "--as-module":          # `python -m qfinal ...`
        import runpy
        sys.argv = ["qfinal"] + sys.argv[2:]
        runpy.run_module("qfinal", run_name="__main__", alter_sys=True)
    else:
        from qfinal.cli.app import main
        main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & set(HEAVY))
sys.stdout.flush()
sys.stderr.flush()
print("\\n{MARK}" + json.dumps({{"code": code, "heavy": heavy}}), flush=True)
"""


def run_cli(*args: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, everything printed) of `qfinal ARGS` in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("QFINAL_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=120)
    marks = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert marks, f"the child did not report (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    result = json.loads(marks[-1][len(MARK) :])
    return result["code"], result["heavy"], proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("--as-module", "--help"),
        ("--as-module", "--version"),
    ],
    ids=lambda a: " ".join(a),
)
def test_help_and_version_import_nothing_heavy(args):
    code, heavy, output = run_cli(*args)
    assert code == 0, output
    assert heavy == [], f"qfinal {' '.join(args)} imported {heavy}"
    if "--version" in args:
        from qfinal import __version__

        assert f"qfinal {__version__}" in output
    else:
        assert "load" in output and "validate" in output


@pytest.mark.parametrize("command", ["load", "validate", "dequantize", "save"])
def test_command_help_imports_nothing_heavy(command):
    code, heavy, output = run_cli(command, "--help")
    assert code == 0, output
    assert heavy == [], f"qfinal {command} --help imported {heavy}"
    assert "Usage" in output or "usage" in output


@pytest.mark.parametrize(
    "args",
    [
        ("load",),  # missing SOURCE
        ("load", "--no-such-option", "x"),  # unknown option
        ("dequantize", "only-one-argument"),  # missing OUT
        ("no-such-command",),
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2_without_heavy_imports(args):
    code, heavy, output = run_cli(*args)
    assert code == 2, f"qfinal {' '.join(args)} exited {code}, want 2 (usage error):\n{output[-2000:]}"
    assert "Traceback" not in output, output
    assert heavy == [], f"qfinal {' '.join(args)} imported {heavy}"


@pytest.mark.parametrize(
    "args",
    [
        ("load", "somewhere", "--quantize", "nf5"),
        ("load", "somewhere", "--max-memory", "not-a-budget"),
        ("validate", "somewhere", "--fail-on", "never"),
        ("dequantize", "somewhere", "out", "--dtype", "float64"),
        ("save", "somewhere", "out", "--max-shard-size", "huge"),
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_option_values_exit_2_without_heavy_imports(args, tmp_path):
    args = tuple(str(tmp_path / a) if a in ("somewhere", "out") else a for a in args)
    code, heavy, output = run_cli(*args)
    assert code == 2, f"qfinal {' '.join(args)} exited {code}, want 2:\n{output[-2000:]}"
    assert "Traceback" not in output, output
    assert heavy == [], f"qfinal {' '.join(args)} imported {heavy} before rejecting an option value"


@pytest.mark.parametrize("user_verbosity", [None, "info"])
def test_quiet_libraries_does_not_import_transformers(user_verbosity):
    """Silencing transformers must not import it; the variables it reads on import do the job,
    and a verbosity the user chose is kept."""
    code = (
        "import os, sys; from qfinal.cli.output import quiet_libraries; quiet_libraries(); "
        "from transformers.utils import logging; "
        "print('ok', os.environ['TRANSFORMERS_VERBOSITY'], "
        "logging.get_verbosity(), logging.is_progress_bar_enabled())"
    )
    probe = (
        "import sys; from qfinal.cli.output import quiet_libraries; quiet_libraries(); "
        "print('transformers' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    if user_verbosity:
        env["TRANSFORMERS_VERBOSITY"] = user_verbosity
    lazy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert lazy.returncode == 0, lazy.stderr
    assert lazy.stdout.strip() == "False"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    _ok, verbosity, level, bars = done.stdout.split()
    import logging

    want = logging.INFO if user_verbosity == "info" else logging.ERROR
    assert (verbosity, int(level), bars) == (user_verbosity or "error", want, "False")


# ------------------------------------------------------------------------------ leaving fast

LEAVE_CHILD = """
import atexit, sys, threading
mode, marker = sys.argv[1], sys.argv[2]
if mode != "no-torch":
    import torch  # noqa: F401  (what makes leave() skip the interpreter's teardown)
atexit.register(lambda: open(marker, "w").write("atexit ran"))
sys.stdout.write("buffered, no newline")  # still in the buffer when leave() is called
release = threading.Event()
if mode == "busy-thread":
    threading.Thread(target=release.wait, args=(30,), daemon=False).start()
from qfinal.cli.app import leave
try:
    leave(3)
except SystemExit as exc:
    release.set()
    sys.stdout.write(f" | sys.exit({exc.code})")
    raise
"""


@pytest.mark.parametrize("mode, how", [("torch", "fast"), ("no-torch", "sys.exit"), ("busy-thread", "sys.exit")])
def test_leave_keeps_the_code_the_output_and_the_exit_handlers(tmp_path, mode, how):
    """With torch loaded and nothing else running, `leave` skips the interpreter's teardown
    (os._exit) but keeps what an ordinary exit gives: the code, buffered stdout, atexit handlers.
    Without torch, or beside a running non-daemon thread, it is an ordinary sys.exit."""
    marker = tmp_path / "atexit.txt"
    proc = subprocess.run(
        [sys.executable, "-c", LEAVE_CHILD, mode, str(marker)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert marker.read_text() == "atexit ran"
    assert proc.stdout == "buffered, no newline" + ("" if how == "fast" else " | sys.exit(3)")


def test_the_console_script_exits_with_the_check_code_and_complete_json(checkpoints, tmp_path):
    """`python -m qfinal` (the console entry): a failing check still exits 1 after a fast exit,
    with the whole JSON report on stdout and the --junit file written."""
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    for f in checkpoints["llama_tied"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qfinal", "validate", str(bad), "--json", "-", "--junit", str(tmp_path / "junit.xml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert any(f["check"] == "nan_inf" and f["severity"] == "error" for f in report["findings"])
    assert (tmp_path / "junit.xml").read_text().rstrip().endswith("</testsuites>")
