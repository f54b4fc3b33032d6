"""The mapped safetensors writer: the bytes of safetensors' `save_file`, and, inside
`save_pretrained`, the very files transformers writes on its own, on every fixture."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import builders
import pytest
import torch
from safetensors.torch import save_file

import qfinal
from qfinal.checkpoint import writer as shards
from qfinal.checkpoint.writer import save_file_mapped
from qfinal.compat import transformers as _hf


@pytest.fixture
def mapped_calls(monkeypatch):
    """Records, per call of the mapped writer, whether it wrote the file itself (True) or left it
    to save_file (False)."""
    calls: list[bool] = []
    real = shards._mapped_plan

    def spy(tensors, metadata):
        plan = real(tensors, metadata)
        calls.append(plan is not None)
        return plan

    monkeypatch.setattr(shards, "_mapped_plan", spy)
    return calls


def contiguous(tensors: dict) -> dict:
    return {k: v.contiguous() for k, v in tensors.items()}


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None, {}], ids=["pt", "none", "empty"])
def test_mapped_writer_matches_save_file(tmp_path, mapped_calls, metadata):
    tensors = contiguous(builders.writer_tensors())
    save_file(tensors, tmp_path / "want", metadata=metadata)
    save_file_mapped(tensors, tmp_path / "got", metadata=metadata)
    assert mapped_calls == [True]
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()


def test_mapped_writer_header_padding_and_large_tensors(tmp_path, mapped_calls):
    """Header lengths of every residue mod 8, and tensors of many pages at unaligned offsets."""
    g = torch.Generator().manual_seed(5)
    for n in range(1, 9):
        tensors = {"w" * n: torch.randn(1031 + n, 67, generator=g).half(), "b": torch.randn(3, generator=g)}
        save_file(tensors, tmp_path / "want", metadata={"format": "pt"})
        save_file_mapped(tensors, tmp_path / "got", metadata={"format": "pt"})
        assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes(), n
    assert mapped_calls == [True] * 8


def test_mapped_writer_takes_slices_of_one_storage(tmp_path, mapped_calls):
    """Tensors that are disjoint slices of one buffer (as safetensors' mmap loading gives them) are
    not shared tensors: written by the mapped path, same bytes."""
    buffer = torch.arange(64, dtype=torch.float32)
    tensors = {"a": buffer[:16], "b": buffer[16:48].view(4, 8), "c": buffer[48:]}
    save_file(tensors, tmp_path / "want")
    save_file_mapped(tensors, tmp_path / "got")
    assert mapped_calls == [True]
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the outcome itself is compared
        return type(err), str(err)
    return None


@pytest.mark.parametrize(
    "case", ["overlapping", "non_contiguous", "not_a_tensor", "two_metadata_keys", "sparse", "empty_dict"]
)
def test_what_save_file_treats_specially_goes_to_save_file(tmp_path, mapped_calls, case):
    """Refused or special input: save_file itself handles it, so the outcome (error type and
    words, or the file) is exactly its own."""
    buffer = torch.arange(10, dtype=torch.float32)
    tensors, metadata = {
        "overlapping": ({"a": buffer[:6], "b": buffer[4:]}, None),
        "non_contiguous": ({"t": torch.ones(3, 4).t()}, None),
        "not_a_tensor": ({"x": [1, 2]}, None),
        "two_metadata_keys": ({"a": buffer}, {"format": "pt", "origin": "test"}),
        "sparse": ({"s": torch.eye(3).to_sparse()}, None),
        "empty_dict": ({}, {"format": "pt"}),
    }[case]
    want = _outcome(lambda: save_file(tensors, tmp_path / "want", metadata=metadata))
    got = _outcome(lambda: save_file_mapped(tensors, tmp_path / "got", metadata=metadata))
    assert mapped_calls == [False]
    assert got == want
    assert (want is not None) == (case in {"overlapping", "non_contiguous", "not_a_tensor", "sparse"})
    if want is None:
        from safetensors import safe_open

        for name in ("want", "got"):
            with safe_open(tmp_path / name, "pt") as fh:
                assert fh.metadata() == metadata and sorted(fh.keys()) == sorted(tensors)


def test_a_full_disk_is_an_error_before_any_byte_is_copied(tmp_path, monkeypatch):
    """Blocks are reserved first: ENOSPC is an OSError there, never a SIGBUS in the copy."""

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as err:
        save_file_mapped({"w": torch.ones(4)}, tmp_path / "x.safetensors")
    assert err.value.errno == errno.ENOSPC
    assert (tmp_path / "x.safetensors").stat().st_size == 0  # nothing was mapped or copied


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_filesystem_without_fallocate_gets_save_files_bytes(tmp_path, monkeypatch, code):
    def unsupported(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    tensors = contiguous(builders.writer_tensors())
    save_file(tensors, tmp_path / "want", metadata={"format": "pt"})
    save_file_mapped(tensors, tmp_path / "got", metadata={"format": "pt"})
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()


# ----------------------------------------------------------------------------------------- inside save_pretrained


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("max_shard_size", ["2GB", "100KB"])
@pytest.mark.parametrize(
    "fixture,quantize",
    [
        ("llama_tied", None),
        ("llama_untied", None),
        ("gpt2", None),
        ("bert", None),
        ("t5", None),
        ("llama_sharded", None),
        ("llama_tied", "nf4"),
        ("gpt2", "int8"),
    ],
)
def test_save_pretrained_with_the_mapped_writer_writes_transformers_files(
    checkpoints, tmp_path, mapped_calls, fixture, quantize, max_shard_size
):
    """Every file (shards, index, config, generation config) byte for byte what `save_pretrained`
    writes with safetensors' own writer, and the mapped path really wrote the weights."""
    model = qfinal.load(checkpoints[fixture], **({"quantize": quantize} if quantize else {})).model
    model.save_pretrained(tmp_path / "transformers", max_shard_size=max_shard_size)
    assert mapped_calls == []
    _hf.save_pretrained(model, tmp_path / "qfinal", max_shard_size, save_file_mapped)
    want, got = _files(tmp_path / "transformers"), _files(tmp_path / "qfinal")
    assert list(got) == list(want)
    assert [name for name in want if got[name] != want[name]] == []
    weight_files = [name for name in want if name.endswith(".safetensors")]
    assert len(mapped_calls) == len(weight_files) and all(mapped_calls)
    assert (len(weight_files) > 1) == (max_shard_size == "100KB")


def test_the_writer_swap_is_undone_even_when_saving_fails(checkpoints, tmp_path):
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file
    model = qfinal.load(checkpoints["llama_untied"]).model

    def broken(*_a, **_k):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        _hf.save_pretrained(model, tmp_path / "out", "2GB", broken)
    assert modeling_utils.safe_save_file is original


def test_qfinal_save_writes_plain_models_with_the_mapped_writer(checkpoints, tmp_path, mapped_calls):
    report = qfinal.save(checkpoints["llama_untied"], tmp_path / "out", max_shard_size="100KB")
    assert report.ok and report.extra["save"]["writer"] == "save_pretrained"
    shards_written = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors"]
    assert len(shards_written) > 1 and mapped_calls == [True] * len(shards_written)


@pytest.mark.parametrize("failing", ["direct", "all"])
def test_a_disk_filling_mid_write_raises_its_own_error(tmp_path, monkeypatch, failing):
    """ENOSPC in the helper thread's direct writes reaches the caller as that OSError: no staging
    buffer is left pinned by the error (it was a BufferError at close). "all" (the caller's own
    buffered writes failing as well) passed before the fix too; it keeps that path covered."""
    from qfinal.checkpoint.writer import PositionalFile, ShardWriter

    probe = PositionalFile(tmp_path / "probe")
    has_direct = probe.direct
    probe.close()
    if failing == "direct" and not has_direct:
        pytest.skip("this filesystem has no O_DIRECT: no helper-thread writes")
    real = os.pwrite
    direct_fds = set()
    original_init = PositionalFile.__init__

    def init(self, path):
        original_init(self, path)
        direct_fds.add(self._direct)

    def pwrite(fd, data, offset):
        if offset > 0 and (failing == "all" or fd in direct_fds):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(PositionalFile, "__init__", init)
    monkeypatch.setattr(os, "pwrite", pwrite)
    big = torch.ones(5 << 20)  # 20 MiB: more than the two 8 MiB staging buffers
    with pytest.raises(OSError) as err:
        with ShardWriter(tmp_path / "x.safetensors", [("w", torch.float32, list(big.shape))]) as writer:
            writer.write("w", big)
    assert err.value.errno == errno.ENOSPC
