"""`qfinal quantize` against transformers' quantize-on-load + `save_pretrained`, file for file.

Every file transformers writes (each shard, the index, config.json, generation_config.json) must
be byte-identical in qfinal's output, and the output must load with plain `from_pretrained`.
"""

from __future__ import annotations

import json

import pytest
import transformers as tf
from builders import QUANT_OPTIONS, bits_equal, model_class_for, read_tensors, run_cli

from qfinal.ops.quantize import run_quantize

CASES = [
    ("llama_tied", "nf4", None),
    ("llama_untied", "fp4", None),
    ("gpt2", "nf4", None),  # Conv1D: transposed before quantizing
    ("gpt2", "int8", "60KB"),  # biases between a weight and its quant state; sharded
    ("bert", "nf4_dq", None),
    ("t5", "nf4", None),  # encoder-decoder, shared embeddings, wo kept out
    ("t5", "int8", None),
    ("llama_sharded", "nf4_dq", "100KB"),  # several shards and the index
    ("llama_sharded", "int8", "60KB"),
    ("llama_untied", "fp4_dq", "20KB"),  # a weight larger than a shard, quant state split off
]


def _reference(source, folder, method, shard):
    cls = model_class_for(source)
    model = cls.from_pretrained(source, quantization_config=tf.BitsAndBytesConfig(**QUANT_OPTIONS[method]))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def _options(method: str) -> dict:
    return {"method": method.removesuffix("_dq"), "double_quant": method.endswith("_dq")}


@pytest.mark.parametrize(("fixture", "method", "shard"), CASES)
def test_quantize_writes_transformers_bytes(checkpoints, tmp_path, fixture, method, shard):
    source = checkpoints[fixture]
    expected = _reference(source, tmp_path / "transformers", method, shard)
    out = tmp_path / "qfinal"
    report = run_quantize(source, out, max_shard_size=shard or "50GB", **_options(method))
    names = sorted(p.name for p in expected.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    assert report.extra["quantize"]["files"] == names
    if shard:
        assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert report.keys.converted, "nothing was quantized"


def test_output_loads_with_plain_from_pretrained(checkpoints, tmp_path):
    source = checkpoints["gpt2"]
    run_quantize(source, tmp_path / "q", method="fp4", double_quant=True)
    model = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "q")
    state = model.state_dict()
    stored = read_tensors(tmp_path / "q")
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    for key, value in stored.items():
        assert bits_equal(state[key], value), key


def test_progress_counts_each_tensor_as_its_shard_is_written(checkpoints, tmp_path):
    """One shard, many tensors: the count moves tensor by tensor, not once the shard is done."""
    calls = []
    run_quantize(
        checkpoints["llama_untied"],
        tmp_path / "q",
        method="nf4",
        progress=lambda done, total: calls.append((done, total)),
    )
    total = calls[-1][1]
    assert total > 1 and calls == [(done, total) for done in range(1, total + 1)]


def test_skip_modules_and_dtype_follow_transformers(checkpoints, tmp_path):
    source = checkpoints["llama_untied"]
    config = tf.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "up_proj"])
    model = tf.LlamaForCausalLM.from_pretrained(source, quantization_config=config, dtype="bfloat16")
    model.save_pretrained(tmp_path / "ref")
    report = run_quantize(source, tmp_path / "q", method="fp4", skip_modules=["lm_head", "up_proj"], dtype="bfloat16")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not any(c.module.endswith("up_proj") for c in report.keys.converted)
    assert any(c.module.endswith("down_proj") for c in report.keys.converted)


def test_dry_run_writes_nothing_and_says_what_it_would(checkpoints, tmp_path):
    report = run_quantize(
        checkpoints["llama_sharded"], tmp_path / "q", method="nf4", max_shard_size="100KB", dry_run=True
    )
    assert not (tmp_path / "q").exists()
    info = report.extra["quantize"]
    assert info["dry_run"] and len(info["files"]) > 1 and info["total_bytes"] > 0
    assert info["peak_rss_estimate_bytes"] > 0


def test_cli_refuses_a_quantized_source_and_a_bad_method(checkpoints, tmp_path, capsys):
    nf4 = checkpoints.quantized("llama_tied", "nf4")
    code, _out, err = run_cli(capsys, "quantize", str(nf4), str(tmp_path / "x"), "--quantize", "nf4")
    assert code == 2 and "already quantized" in err
    code, _out, err = run_cli(capsys, "quantize", str(checkpoints["gpt2"]), str(tmp_path / "y"), "--quantize", "q3")
    assert code == 2 and "--quantize" in err
    code, _out, err = run_cli(
        capsys, "quantize", str(checkpoints["gpt2"]), str(tmp_path / "y"), "--quantize", "int8", "--double-quant"
    )
    assert code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_quantize_writes_and_reports(checkpoints, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, _err = run_cli(
        capsys, "quantize", str(checkpoints["llama_tied"]), str(out), "--quantize", "nf4", "--json", "-", "-q"
    )
    assert code == 0
    assert (out / "model.safetensors").is_file()
    assert "model.safetensors" in json.loads(stdout)["extra"]["quantize"]["files"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_quant_storage_compute_dtype_and_fp16_follow_transformers(checkpoints, tmp_path):
    import torch

    source = checkpoints["llama_tied"]
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    tf.LlamaForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float16).save_pretrained(
        tmp_path / "ref"
    )
    run_quantize(
        source,
        tmp_path / "q",
        method="nf4",
        double_quant=True,
        quant_storage="bfloat16",
        compute_dtype="bfloat16",
        dtype="float16",
    )
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
