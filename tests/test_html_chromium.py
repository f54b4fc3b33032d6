"""The HTML reports open in a real browser: headless Chromium screenshots them.

Needs Debian's `chromium` package (/usr/bin/chromium); the test installs nothing and is skipped
when it is absent. A screenshot of a blank page is the baseline: a rendered report (tables and an
SVG chart) must compress to a much larger PNG of the requested size.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import builders
import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed "
    "(Debian: apt-get install -y chromium); the HTML report is not screenshotted",
)
WIDTH, HEIGHT = 1200, 900


def screenshot(page: Path, png: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="qfinal-chromium-") as profile:
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={WIDTH},{HEIGHT}",
            page.resolve().as_uri(),
        ]
        env = {**os.environ, "HOME": profile}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.is_file(), proc.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (WIDTH, HEIGHT)
    return data


def _html(capsys, argv) -> None:
    code, _out, err = builders.run_cli(capsys, *argv)
    assert code in (0, 1) and "Traceback" not in err, err


def test_reports_render_in_headless_chromium(checkpoints, tmp_path, capsys):
    nf4 = tmp_path / "nf4.yaml"
    nf4.write_text("quantize:\n  method: nf4\n")
    diff_page, quality_page = tmp_path / "diff.html", tmp_path / "quality.html"
    _html(capsys, ["diff", checkpoints["gpt2"], checkpoints["gpt2"], "--config-a", nf4, "--html", diff_page, "-q"])
    _html(capsys, ["load", checkpoints["gpt2"], "-c", nf4, "--html", quality_page, "-q"])
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body></body></html>")

    baseline = len(screenshot(blank, tmp_path / "blank.png"))
    for page in (diff_page, quality_page):
        size = len(screenshot(page, tmp_path / f"{page.stem}.png"))
        assert size > max(20_000, 3 * baseline), (page.name, size, baseline)
