"""prescan: the NaN scan of a plain load read from the files while torch imports.

The danger is a wrong answer: trusting file bytes that are not the tensor's, or bytes that changed
after the scan. Each way a result must be refused is pinned here, and every verdict is compared
with torch's own isfinite.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qfinal
from qfinal.checkpoint import inventory as safety
from qfinal.checkpoint import prescan
from qfinal.checkpoint.residency import FileViews
from qfinal.checkpoint.sources import Source
from qfinal.checks import nan as checks
from qfinal.config import build_config

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")


@pytest.fixture
def no_racy_wait(monkeypatch):
    """Files written by the test count as settled at once (the default waits a second)."""
    monkeypatch.setattr(prescan, "RACY_SECONDS", 0.0)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def finished(folder: Path) -> prescan.Prescan:
    scan = prescan.Prescan(Source(str(folder), folder, folder)).start()
    scan._thread.join()
    assert scan.error is None
    return scan


class CountingScan:
    """Counts the tensors nan_findings still had to read itself."""

    def __init__(self, monkeypatch):
        self.read = []
        original = checks._all_finite

        def counted(tensor, *args, **kwargs):
            self.read.append(tuple(tensor.shape))
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(checks, "_all_finite", counted)


def as_model(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = torch.nn.Module()
    for name, value in tensors.items():
        model.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    return model


# ----------------------------------------------------------------------------- the bit test

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
INT_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(FLOAT_DTYPES)), st.data())
def test_the_bit_test_agrees_with_isfinite_on_any_bits(tmp_path_factory, name, data):
    """Every bit pattern: NaN payloads of either sign, ±Inf, -0.0, subnormals, the largest finite."""
    dtype = FLOAT_DTYPES[name]
    bits = INT_OF[dtype]
    width = torch.iinfo(bits).bits
    special = torch.tensor(
        [
            float("inf"),
            float("-inf"),
            float("nan"),
            -0.0,
            torch.finfo(dtype).max,
            -torch.finfo(dtype).max,
            torch.finfo(dtype).tiny / 2,
        ],
        dtype=dtype,
    ).view(bits)
    raw = data.draw(
        st.lists(
            st.integers(-(1 << (width - 1)), (1 << (width - 1)) - 1) | st.sampled_from(special.tolist()),
            min_size=1,
            max_size=40,
        )
    )
    values = torch.tensor(raw, dtype=bits).view(dtype)
    path = tmp_path_factory.mktemp("bits") / "t.bin"
    path.write_bytes(values.view(bits).numpy().tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        verdict = prescan.Prescan(SimpleNamespace())._clean_range(np, fd, 0, path.stat().st_size, name)
    finally:
        os.close(fd)
    assert verdict is bool(torch.isfinite(values).all())


@pytest.mark.parametrize("name", ["BF16", "F32", "F64"])
@pytest.mark.parametrize("where", ["first", "last", "straddles", "after"])
def test_windows_cover_every_element_once(tmp_path, name, where):
    """Data at an odd file offset, mapped one page-sized window at a time: an element cut by a
    window's end is read whole from the next window, and nothing outside [start, end) counts."""
    dtype = FLOAT_DTYPES[name]
    width = torch.finfo(dtype).bits // 8
    page = mmap.ALLOCATIONGRANULARITY
    start = 8 + 3  # odd, as a header of any length can leave it
    values = torch.zeros(3 * page // width + 5, dtype=dtype)
    cut = (page - start) // width  # the element that straddles the first window's end
    index = {"first": 0, "last": values.numel() - 1, "straddles": cut}.get(where)
    if index is not None:
        values[index] = float("nan")
    tail = torch.tensor([float("inf")], dtype=dtype) if where == "after" else torch.zeros(0, dtype=dtype)
    path = tmp_path / "t.bin"
    path.write_bytes(
        b"x" * start + values.view(torch.uint8).numpy().tobytes() + tail.view(torch.uint8).numpy().tobytes()
    )
    assert (start + cut * width) < page < (start + (cut + 1) * width)  # really straddles
    fd = os.open(path, os.O_RDONLY)
    try:
        verdict = prescan.Prescan(SimpleNamespace())._clean_range(
            np, fd, start, start + values.numel() * width, name, window=page
        )
    finally:
        os.close(fd)
    assert verdict is (index is None)


# ----------------------------------------------------------------------------- what is trusted


@linux
def test_a_clean_checkpoint_is_not_read_again(tmp_path, monkeypatch, no_racy_wait):
    tensors = {
        "a": torch.randn(300, 70).to(torch.bfloat16),
        "b": torch.randn(513),
        "c": torch.randn(9).half(),
        "steps": torch.arange(5),
    }
    folder = write_checkpoint(tmp_path / "clean", tensors)
    scan = finished(folder)
    assert scan.scanned_bytes == sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "steps")
    counting = CountingScan(monkeypatch)
    loaded = load_file(str(folder / "model.safetensors"))
    model = as_model({k: v for k, v in loaded.items() if v.is_floating_point()})
    try:
        assert checks.nan_findings(model, scan) == []
    finally:
        scan.close()
    assert counting.read == []


@linux
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_nan_in_the_file_gives_the_same_finding_as_without_prescan(tmp_path, no_racy_wait, dtype):
    values = torch.randn(200, 64).to(dtype)
    values[199, 63] = float("nan")
    values[3, 0] = float("-inf")
    folder = write_checkpoint(tmp_path / "bad", {"bad": values, "good": torch.randn(64, 64).to(dtype)})
    scan = finished(folder)
    model = as_model(load_file(str(folder / "model.safetensors")))
    try:
        with_prescan = checks.nan_findings(model, scan)
    finally:
        scan.close()
    assert with_prescan == checks.nan_findings(model)
    assert [(f.key, f.message) for f in with_prescan] == [
        ("bad", f"1 NaN and 1 Inf value(s) in 12800 ({str(dtype).removeprefix('torch.')})")
    ]


@linux
def test_a_value_written_in_memory_is_not_taken_from_the_file(tmp_path, monkeypatch, no_racy_wait):
    folder = write_checkpoint(tmp_path / "m", {"w": torch.randn(2048, 16), "v": torch.randn(2048, 16)})
    scan = finished(folder)
    loaded = load_file(str(folder / "model.safetensors"))
    loaded["w"][1000, 5] = float("inf")  # a private copy of one page (inside w): not the file's bytes
    counting = CountingScan(monkeypatch)
    try:
        findings = checks.nan_findings(as_model(loaded), scan)
    finally:
        scan.close()
    assert [f.key for f in findings] == ["w"] and counting.read == [(2048, 16)]


@linux
def test_a_file_changed_after_the_scan_is_not_trusted(tmp_path, no_racy_wait):
    folder = write_checkpoint(tmp_path / "c", {"w": torch.randn(512, 64)})
    path = folder / "model.safetensors"
    scan = finished(folder)
    stat = path.stat()
    bad = torch.randn(512, 64)
    bad[0, 0] = float("nan")
    save_file({"w": bad}, str(tmp_path / "same-size.safetensors"))
    with open(path, "r+b") as fh:  # same inode, same size, mtime put back: only ctime tells
        fh.write((tmp_path / "same-size.safetensors").read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    model = as_model(load_file(str(path)))
    try:
        with FileViews() as views:
            where = views.locate(model.w)
            assert where is not None and not scan.clean(where)
        assert [f.key for f in checks.nan_findings(model, scan)] == ["w"]
    finally:
        scan.close()


@linux
def test_a_file_written_a_moment_ago_is_not_scanned(tmp_path, monkeypatch):
    """Within RACY_SECONDS of its last change a file could change again in the same timestamp tick."""
    monkeypatch.setattr(prescan, "RACY_SECONDS", 600.0)  # "a moment" however slow the machine is
    folder = write_checkpoint(tmp_path / "fresh", {"w": torch.randn(64, 64)})
    scan = finished(folder)
    try:
        assert scan.scanned_bytes == 0 and scan._files == {}
    finally:
        scan.close()


@linux
def test_a_span_inside_one_clean_entry_is_trusted_and_one_across_two_is_not(tmp_path, no_racy_wait):
    folder = write_checkpoint(tmp_path / "s", {"a": torch.randn(1024, 8), "b": torch.randn(1024, 8)})
    scan = finished(folder)
    loaded = load_file(str(folder / "model.safetensors"))
    try:
        with FileViews() as views:
            a, b = views.locate(loaded["a"]), views.locate(loaded["b"])
            first, second = (a, b) if a[1] < b[1] else (b, a)
            inside = (first[0], first[1] + 4096, 4096, first[3], (1024,))
            across = (first[0], first[1] + first[2] - 4096, 8192, first[3], (2048,))
            other_dtype = (*first[:3], "torch.int32", first[4])
            assert scan.clean(first) and scan.clean(second) and scan.clean(inside)
            assert not scan.clean(across) and not scan.clean(other_dtype)
    finally:
        scan.close()


# ----------------------------------------------------------------------------- when it runs


@pytest.mark.parametrize(
    "overrides, runs",
    [
        ({}, True),
        ({"quantize": "nf4"}, False),
        ({"dequantize": True}, False),
        ({"device_map": "auto"}, False),
        ({"validate": {"check_nan": False}}, False),
        ({"validate": {"enabled": False}}, False),
        ({"stop_after": "checkpoint_dispatch"}, False),
    ],
)
def test_it_runs_only_for_a_plain_cpu_load_that_checks_nan(monkeypatch, overrides, runs):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert prescan.eligible(build_config(None, **overrides)) is (runs and sys.platform.startswith("linux"))


def test_one_core_leaves_it_off(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert prescan.eligible(build_config(None)) is False


@linux
def test_a_load_uses_it_and_agrees_with_a_load_without_it(checkpoints, monkeypatch, no_racy_wait):
    folder = checkpoints["llama_untied"]
    started = []
    original = prescan.start_for

    def spy(ctx):
        scan = original(ctx)
        started.append(scan)
        return scan

    monkeypatch.setattr(prescan, "start_for", spy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    counting = CountingScan(monkeypatch)
    with_scan = qfinal.load(folder)
    assert len(started) == 1 and started[0] is not None and started[0].scanned_bytes > 0
    assert started[0]._files == {}  # closed with the load
    read_with = len(counting.read)
    counting.read.clear()
    without = qfinal.load(folder, validate={"check_nan": False})
    assert with_scan.report.ok and without.report.ok
    float_buffers = sum(b.is_floating_point() for b in with_scan.model.buffers())
    assert read_with <= float_buffers  # every weight came from the scan; computed buffers are read
    assert [f.model_dump() for f in with_scan.report.findings if f.check != "nan_inf"] == [
        f.model_dump() for f in without.report.findings if f.check != "nan_inf"
    ]


def test_a_broken_folder_leaves_the_error_to_the_load(tmp_path, no_racy_wait):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    scan = finished(folder)
    try:
        assert scan._files == {} and scan.scanned_bytes == 0
    finally:
        scan.close()


@linux
def test_a_header_that_changed_after_the_inventory_is_not_trusted(tmp_path, monkeypatch, no_racy_wait):
    """The inventory is read before the file's baseline stat; a rewrite in between with another
    layout (here a 2-byte shift, and a NaN) must not be scanned with the old offsets."""
    folder = write_checkpoint(tmp_path / "h", {"a": torch.randn(8).half(), "w": torch.randn(256, 64)})
    old_inventory = safety.inspect_checkpoint(folder)
    bad = torch.randn(256, 64)
    bad[100, 7] = float("nan")
    write_checkpoint(folder, {"a": torch.randn(9).half(), "w": bad})
    monkeypatch.setattr(safety, "inspect_checkpoint", lambda *a, **k: old_inventory)
    scan = finished(folder)
    model = as_model(load_file(str(folder / "model.safetensors")))
    try:
        assert scan._files == {} and scan.scanned_bytes == 0
        assert [f.key for f in checks.nan_findings(model, scan)] == ["w"]
    finally:
        scan.close()


@linux
def test_a_span_that_is_not_element_aligned_is_not_trusted(tmp_path, no_racy_wait):
    folder = write_checkpoint(tmp_path / "al", {"w": torch.randn(1024)})
    scan = finished(folder)
    loaded = load_file(str(folder / "model.safetensors"))
    try:
        with FileViews() as views:
            identity, offset, nbytes, dtype, shape = views.locate(loaded["w"])
        assert scan.clean((identity, offset, nbytes, dtype, shape))
        assert not scan.clean((identity, offset + 2, nbytes - 4, dtype, shape))
    finally:
        scan.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@linux
def test_one_descriptor_per_file_and_none_after_close(tmp_path, no_racy_wait):
    folder = write_checkpoint(tmp_path / "fd", {"w": torch.randn(64, 64)})
    before = _open_fds()
    scan = finished(folder)
    entries = list(safety.inspect_checkpoint(folder).tensors.values())
    scan._scan_file(np, folder / "model.safetensors", entries)  # same inode again
    assert len(scan._files) == 1 and _open_fds() == before + 1
    scan.close()
    assert _open_fds() == before


def test_an_error_in_the_thread_leaves_the_scan_to_validate(tmp_path, monkeypatch, no_racy_wait):
    def broken(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(safety, "inspect_checkpoint", broken)
    values = torch.randn(64, 64)
    values[1, 1] = float("inf")
    folder = write_checkpoint(tmp_path / "err", {"w": values})
    scan = prescan.Prescan(Source(str(folder), folder, folder)).start()
    scan._thread.join()
    assert isinstance(scan.error, MemoryError)
    try:
        assert [f.key for f in checks.nan_findings(as_model(load_file(str(folder / "model.safetensors"))), scan)] == [
            "w"
        ]
    finally:
        scan.close()


@linux
def test_a_nan_in_a_shard_fails_a_real_load_with_the_prescan_on(checkpoints, tmp_path, monkeypatch, no_racy_wait):
    """Through the whole pipeline: the poisoned tensor is reported, every other weight came from the scan."""
    import shutil

    from safetensors.torch import save_file as write

    folder = tmp_path / "poisoned"
    shutil.copytree(checkpoints["llama_untied"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    weights[key][3, 5] = float("nan")
    write(dict(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    used = []
    original = prescan.start_for
    monkeypatch.setattr(prescan, "start_for", lambda ctx: used.append(original(ctx)) or used[-1])
    counting = CountingScan(monkeypatch)
    result = qfinal.load(folder)
    assert used and used[0] is not None and used[0].scanned_bytes > 0
    bad = [f for f in result.report.findings if f.check == "nan_inf"]
    assert [(f.key, f.message) for f in bad] == [(key, "1 NaN and 0 Inf value(s) in 8192 (float32)")]
    float_buffers = sum(b.is_floating_point() for b in result.model.buffers())
    assert len(counting.read) <= float_buffers + 1  # the poisoned weight, and computed buffers
