"""`qfinal quantize` with large tensors read and quantized a slab of rows at a time: the slab size is
forced tiny (QFINAL_CHUNK_BYTES=1, one block-aligned slab of rows each), and the files must
still be transformers' bytes; the slabs of an odd-shaped weight must give bitsandbytes' own result."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from bitsandbytes import functional as bnb_functional
from builders import QUANT_OPTIONS, model_class_for
from safetensors.torch import save_file

from qfinal.checkpoint.writer import ShardWriter
from qfinal.ops import quantize_pieces
from qfinal.ops.dequantize_plan import SourceReader
from qfinal.ops.quantize import run_quantize
from qfinal.ops.quantize_pieces import CHUNK_ENV, computed_in_slabs, row_step
from qfinal.ops.quantize_plan import QuantOptions, TensorJob

CASES = [
    ("llama_untied", "nf4", None),
    ("gpt2", "int8", "60KB"),  # Conv1D weights whole, the embeddings in slabs
    ("llama_sharded", "fp4_dq", "100KB"),
    ("t5", "int8", None),
]


@pytest.mark.parametrize(("fixture", "method", "shard"), CASES)
def test_tiny_slabs_write_transformers_bytes(checkpoints, tmp_path, monkeypatch, fixture, method, shard):
    source = checkpoints[fixture]
    model = model_class_for(source).from_pretrained(
        source, quantization_config=tf.BitsAndBytesConfig(**QUANT_OPTIONS[method])
    )
    model.save_pretrained(tmp_path / "ref", **({"max_shard_size": shard} if shard else {}))
    monkeypatch.setenv(CHUNK_ENV, "1")
    slab_counts = []  # slabs per tensor read in slabs: the test fails if slabbing silently stops
    real = quantize_pieces.read_row_slabs

    def spy(path, key, stored, shape, bounds, workspace=None):
        slab_counts.append(len(bounds))
        return real(path, key, stored, shape, bounds, workspace)

    monkeypatch.setattr(quantize_pieces, "read_row_slabs", spy)
    out = tmp_path / "q"
    run_quantize(
        source,
        out,
        method=method.removesuffix("_dq"),
        double_quant=method.endswith("_dq"),
        max_shard_size=shard or "50GB",
    )
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert any(count > 1 for count in slab_counts), "no tensor was read in slabs"


def _pieces_file(tmp_path, job, options, step):
    """The outputs of `job` written through `ShardWriter` from their slabs, read back."""
    from safetensors.torch import load_file

    src = SourceReader(tmp_path, tmp_path)
    outputs = list(computed_in_slabs(job, src, options, step))
    entries, seen = [], set()
    for name, _at, tensor in outputs:
        if name not in seen:
            seen.add(name)
            size = sum(t.numel() * t.element_size() for n, _a, t in outputs if n == name)
            dtype = tensor.dtype if _at is None or job.kind != "4bit" else torch.uint8
            shape = list(tensor.shape) if _at is None else [size // torch.empty(0, dtype=dtype).element_size()]
            entries.append((name, dtype, shape))
    with ShardWriter(tmp_path / "out.safetensors", entries) as writer:
        for name, at, tensor in reversed(outputs):  # any order
            writer.write(name, tensor) if at is None else writer.write_part(name, at, tensor)
    src.close()
    return load_file(tmp_path / "out.safetensors")


@pytest.mark.parametrize("quant", ["nf4", "fp4_dq"])
def test_slabs_with_a_partial_last_block_match_bitsandbytes(tmp_path, monkeypatch, quant):
    weight = torch.randn(37, 50, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    weight[5, 7] = 40.0
    save_file({"w.weight": weight}, tmp_path / "model.safetensors")
    monkeypatch.setenv(CHUNK_ENV, "1")
    job = TensorJob("w.weight", "4bit", "bfloat16")
    step = row_step(job, ("BF16", [37, 50]))
    assert step == 32  # 32 * 50 elements: whole blocks; the second slab ends in a partial block
    options = QuantOptions(quant.removesuffix("_dq"), quant.endswith("_dq"))
    got = _pieces_file(tmp_path, job, options, step)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type=options.method, compress_statistics=options.double_quant
    )
    assert torch.equal(got["w.weight"], packed.reshape(-1))
    expected = state.as_dict(packed=True)
    assert sorted(got) == sorted(["w.weight"] + [f"w.weight.{k}" for k in expected])
    for key, value in expected.items():
        assert torch.equal(got[f"w.weight.{key}"], value), key


def test_int8_and_copy_slabs_match_whole(tmp_path, monkeypatch):
    weight = torch.randn(9, 70, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    save_file({"w.weight": weight}, tmp_path / "model.safetensors")
    monkeypatch.setenv(CHUNK_ENV, "1")
    job = TensorJob("w.weight", "int8", "bfloat16")
    assert row_step(job, ("BF16", [9, 70])) == 1
    got = _pieces_file(tmp_path, job, QuantOptions("int8"), 2)
    CB, SCB, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
    assert torch.equal(got["w.weight"], CB.reshape(-1)) and torch.equal(got["w.SCB"], SCB)
    (tmp_path / "out.safetensors").unlink()
    copy = TensorJob("w.weight", "copy", "float32")
    got = _pieces_file(tmp_path, copy, QuantOptions("nf4"), 4)
    assert torch.equal(got["w.weight"].view(torch.uint8), weight.float().reshape(-1).view(torch.uint8))


def test_write_part_refuses_overflow_and_reports_missing_bytes(tmp_path):
    with pytest.raises(ValueError, match="never written"):
        with ShardWriter(tmp_path / "a.safetensors", [("x", torch.float32, [4])]) as writer:
            writer.write_part("x", 0, torch.zeros(2))
            with pytest.raises(ValueError, match="outside"):
                writer.write_part("x", 12, torch.zeros(2))
