"""residency: the NaN scan reads never-written mapped tensors from their file, and only those.

The point is memory (a scan must not page in what the forward pass never reads); the danger is a
wrong answer (scanning file bytes that are not the tensor's). Both are pinned here.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qfinal.checkpoint.residency import FileViews, read_chunks
from qfinal.checks import nan as checks

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")


def mapped(tmp_path, tensors: dict[str, torch.Tensor], name="m.safetensors") -> dict[str, torch.Tensor]:
    path = tmp_path / name
    save_file(tensors, str(path))
    return load_file(str(path))  # views of a private mapping of the file, as transformers gets them


def file_bytes(where, nbytes: int) -> bytes:
    fd, offset = where
    return b"".join(bytes(c) for c in read_chunks(fd, offset, nbytes, bytearray(4096)))


@linux
def test_a_never_written_view_is_the_file_and_a_write_is_seen(tmp_path):
    t = mapped(tmp_path, {"a": torch.randn(3000, 500), "b": torch.randn(7)})["a"]
    with FileViews() as views:
        where = views.file_view(t)
        assert where is not None
        assert not views.all_resident(t)
        assert file_bytes(where, t.numel() * 4) == t.numpy().tobytes()
    t[-1, -1] = 1.0  # one page gets a private copy
    with FileViews() as views:
        assert views.file_view(t) is None


@linux
def test_a_replaced_file_is_not_read_for_the_mapping(tmp_path):
    t = mapped(tmp_path, {"a": torch.randn(100, 100)})["a"]
    save_file({"a": torch.zeros(100, 100)}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", tmp_path / "m.safetensors")
    with FileViews() as views:
        assert views.file_view(t) is None


def test_memory_that_is_not_a_file_view():
    with FileViews() as views:
        assert views.file_view(torch.randn(64, 64)) is None
        assert views.file_view(torch.randn(64, 64).t()) is None  # not contiguous
        assert views.file_view(torch.empty(0)) is None


@linux
@pytest.mark.parametrize("position", [0, 1234, -1])
def test_nan_in_the_file_is_found_without_paging_the_tensor_in(tmp_path, position):
    values = torch.randn(4096, 1024).to(torch.bfloat16)
    values.view(-1)[position] = float("nan")
    t = mapped(tmp_path, {"w": values})["w"]
    with FileViews() as views:
        assert views.file_view(t) is not None
        before = views.resident_pages(t)
        assert checks._all_finite(t, views, bytearray(1 << 16)) is False  # chunks of 32768 elements
        assert views.resident_pages(t) == before and before[0] < before[1] // 2


@linux
def test_a_finite_file_view_is_scanned_from_the_file(tmp_path):
    t = mapped(tmp_path, {"w": torch.randn(4096, 1024).to(torch.bfloat16)})["w"]
    with FileViews() as views:
        before = views.resident_pages(t)
        assert checks._all_finite(t, views, bytearray(1 << 12)) is True
        assert views.resident_pages(t) == before and before[0] < before[1] // 2  # left out of memory
    assert checks._all_finite(t) is True  # the in-memory scan agrees (and pages it in)
    with FileViews() as views:
        assert views.all_resident(t)
        assert checks._all_finite(t, views) is True  # resident: read where it is


def test_nan_written_in_memory_is_found(tmp_path):
    t = mapped(tmp_path, {"w": torch.randn(256, 256)})["w"]
    t[100, 3] = float("inf")  # the file is finite; the tensor is not
    with FileViews() as views:
        assert checks._all_finite(t, views) is False


def _model(loaded: dict[str, torch.Tensor], tie: bool) -> torch.nn.Module:
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(512, 64)
    model.embed.weight = torch.nn.Parameter(loaded["embed.weight"], requires_grad=False)
    model.head = torch.nn.Linear(64, 512, bias=False)
    model.head.weight = model.embed.weight if tie else torch.nn.Parameter(loaded["head.weight"], requires_grad=False)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_nan_findings_name_the_tensor_from_either_path(tmp_path, tie):
    tensors = {"embed.weight": torch.randn(512, 64), "head.weight": torch.randn(512, 64)}
    tensors["embed.weight"][5, 5] = float("nan")
    model = _model(mapped(tmp_path, tensors), tie)
    if not tie:
        model.head.weight.data[0, 0] = float("-inf")  # in memory only
    assert checks._lookup_tables(model) == (set() if tie else {id(model.embed.weight)})
    findings = checks.nan_findings(model)
    want = ["embed.weight"] if tie else ["embed.weight", "head.weight"]
    assert sorted(f.key for f in findings) == want
    assert all(f.check == "nan_inf" and f.severity == "error" for f in findings)


@linux
@pytest.mark.parametrize("tie", [False, True])
def test_only_an_untied_embedding_is_read_from_its_file(tmp_path, tie):
    """An embedding table is read from the file (a forward looks up a few rows); a tied head
    reads it whole, so then it, like every other weight, is scanned where it is."""
    model = _model(
        mapped(tmp_path, {"embed.weight": torch.randn(4096, 256), "head.weight": torch.randn(4096, 256)}), tie
    )
    with FileViews() as views:
        before = views.resident_pages(model.embed.weight)
    assert checks.nan_findings(model) == []
    with FileViews() as views:
        after = views.resident_pages(model.embed.weight)
        assert views.all_resident(model.head.weight)  # scanned in memory
    assert (after == before) != tie and before[0] < before[1] // 2
