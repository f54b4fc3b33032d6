"""CUDA checks: most users quantize on a GPU. Skipped (with the reason) where there is none."""

from __future__ import annotations

import builders
import pytest
import torch
import transformers as tf

import qfinal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BNB = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
OVERRIDES = {
    "nf4": {"quantize": "nf4"},
    "fp4_dq": {"quantize": "fp4", "double_quant": True},
    "int8": {"quantize": "int8"},
}


@pytest.mark.cuda
@pytest.mark.parametrize("method", list(BNB))
@pytest.mark.parametrize("fixture", ["llama_tied", "gpt2", "t5"])
def test_gpu_quantization_equals_from_pretrained(checkpoints, fixture, method):
    path = checkpoints[fixture]
    result = qfinal.load(path, device_map="auto", **OVERRIDES[method])
    reference = builders.model_class_for(path).from_pretrained(
        path, device_map="auto", quantization_config=tf.BitsAndBytesConfig(**BNB[method])
    )
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    sa, sb = result.model.state_dict(), reference.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    inputs = {k: v.cuda() for k, v in builders.probe_inputs(reference).items()}
    with torch.no_grad():
        assert torch.equal(result.model(**inputs).logits, reference(**inputs).logits)
    assert result.report.ok


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_gpu_save_round_trip(checkpoints, tmp_path, method):
    report = qfinal.save(checkpoints["llama_tied"], tmp_path / "out", device_map="auto", **OVERRIDES[method])
    assert report.ok, [f for f in report.findings if f.severity == "error"]


@pytest.mark.cuda
def test_gpu_dequantize_matches_transformers(checkpoints, tmp_path):
    source = tmp_path / "nf4"
    model = tf.GPT2LMHeadModel.from_pretrained(
        checkpoints["gpt2"], device_map="auto", quantization_config=tf.BitsAndBytesConfig(**BNB["nf4"])
    )
    model.save_pretrained(source)
    out = tmp_path / "fp16"
    from qfinal.ops.dequantize import dequantize_checkpoint
    from qfinal.ops.dequantize_verify import verify_dequantized

    dequantize_checkpoint(source, out, dtype="float16")
    findings = verify_dequantized(source, out, "float16")
    assert not [f for f in findings if f.severity == "error"], findings
