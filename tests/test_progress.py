"""Progress on a terminal, and none of it in CI, with --json or with --quiet.

The commands run in a child process whose stderr is a pseudo-terminal (what a user's shell gives),
so rich draws its bars; every step is drawn when it starts, however short.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from qfinal.ops.save import SAVE_STEPS


def run_on_a_terminal(*argv, ci: bool = False) -> tuple[int, str]:
    """(exit code, what the command drew on its terminal stderr)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "QFINAL_DEBUG")}
    env.update(TERM="xterm", COLUMNS="120", HF_HUB_OFFLINE="1")
    if ci:
        env["CI"] = "true"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qfinal", *map(str, argv)], stdout=subprocess.DEVNULL, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", errors="replace")


def test_save_shows_each_phase(checkpoints, tmp_path):
    code, drawn = run_on_a_terminal("save", checkpoints["llama_tied"], tmp_path / "out")
    assert code == 0, drawn
    for step in SAVE_STEPS:
        assert step in drawn, step


def test_quantize_on_load_shows_the_bytes_read(checkpoints):
    code, drawn = run_on_a_terminal("load", checkpoints["llama_tied"], "--quantize", "nf4")
    assert code == 0, drawn
    assert "checkpoint_dispatch" in drawn and "bytes read" in drawn


def test_dequantize_shows_tensors_written(checkpoints, tmp_path):
    code, drawn = run_on_a_terminal("dequantize", checkpoints.quantized("llama_tied", "nf4"), tmp_path / "out")
    assert code == 0, drawn
    assert "tensors written" in drawn


@pytest.mark.parametrize("how", ["ci", "json", "quiet"])
def test_no_progress_in_ci_or_with_json_or_quiet(checkpoints, tmp_path, how):
    argv = ["save", checkpoints["llama_tied"], tmp_path / "out"]
    if how == "json":
        argv += ["--json", tmp_path / "report.json"]
    elif how == "quiet":
        argv.append("--quiet")
    code, drawn = run_on_a_terminal(*argv, ci=how == "ci")
    assert code == 0, drawn
    assert drawn.strip() == ""
