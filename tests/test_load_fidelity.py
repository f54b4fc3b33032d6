"""qfinal.load must equal transformers' from_pretrained with the same options, bit for bit."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import builders
import qfinal

FIXTURES = ["llama_tied", "llama_untied", "gpt2", "bert", "t5", "llama_sharded"]
QUANT = {
    "none": ({}, None),
    "nf4": ({"quantize": "nf4"}, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "fp4_dq": ({"quantize": "fp4", "double_quant": True},
               dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)),
    "int8": ({"quantize": "int8"}, dict(load_in_8bit=True)),
}


def assert_state_dicts_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


def assert_logits_identical(a, b):
    inputs = builders.probe_inputs(b)
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_load_equals_from_pretrained(checkpoints, fixture, quant):
    path = checkpoints[fixture]
    overrides, bnb = QUANT[quant]
    result = qfinal.load(path, **overrides)
    kwargs = {"quantization_config": tf.BitsAndBytesConfig(**bnb)} if bnb else {}
    reference = builders.model_class_for(path).from_pretrained(path, **kwargs)

    assert type(result.model) is type(reference)
    assert_state_dicts_identical(result.model, reference)
    assert_logits_identical(result.model, reference)
    assert result.report.ok, result.report.findings
    if bnb:
        packed = [k for k in result.model.state_dict() if k.endswith((".absmax", ".SCB"))]
        assert packed, "quant state must be part of the compared state dict"


@pytest.mark.parametrize("method", ["nf4", "fp4_dq", "int8"])
@pytest.mark.parametrize("fixture", ["llama_tied", "gpt2"])
def test_load_prequantized_equals_from_pretrained(checkpoints, fixture, method):
    path = checkpoints.quantized(fixture, method)
    result = qfinal.load(path)
    reference = builders.model_class_for(path).from_pretrained(path)
    assert_state_dicts_identical(result.model, reference)
    assert_logits_identical(result.model, reference)
    assert result.report.quantization.startswith(method.split("_")[0])
    assert result.report.ok, [f for f in result.report.findings if f.severity == "error"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_option_matches_from_pretrained(checkpoints, dtype):
    path = checkpoints["llama_untied"]
    result = qfinal.load(path, dtype=dtype)
    reference = tf.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    assert_state_dicts_identical(result.model, reference)
    assert result.report.dtype == dtype


def test_stages_in_order_with_time_and_memory(checkpoints):
    report = qfinal.load(checkpoints["llama_tied"]).report
    assert [s.name for s in report.stages] == ["meta_init", "quantizer_preprocess", "checkpoint_dispatch",
                                              "postprocess", "tie_weights", "adapter_load", "runtime", "validate"]
    assert all(s.seconds >= 0 and s.peak_rss_bytes > 0 for s in report.stages)
    statuses = {s.name: s.status for s in report.stages}
    assert statuses["quantizer_preprocess"] == "skipped by request"
    assert statuses["adapter_load"] == "nothing to do"
    assert statuses["checkpoint_dispatch"] == "ran"


def test_stop_after_leaves_model_on_meta(checkpoints):
    result = qfinal.load(checkpoints["llama_tied"], stop_after="quantizer_preprocess", quantize="nf4")
    statuses = [s.status for s in result.report.stages]
    assert statuses[2:] == ["not reached"] * 6
    assert all(p.device.type == "meta" for p in result.model.parameters())
    assert len(result.report.keys.converted) == 14


def test_switching_stages_off_is_reported(checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = builders.model_class_for(checkpoints["llama_tied"]).from_pretrained(checkpoints["llama_tied"])
    get_peft_model(base, LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False)
                   ).save_pretrained(tmp_path / "lora")
    result = qfinal.load(checkpoints["llama_tied"], tie_weights=False, validate={"enabled": False},
                         adapters=[str(tmp_path / "lora")], load_adapters=False)
    statuses = {s.name: s.status for s in result.report.stages}
    assert statuses["tie_weights"] == "skipped by request"
    assert statuses["validate"] == "skipped by request"
    assert statuses["adapter_load"] == "skipped by request"
    assert result.report.adapters == [] and not hasattr(result.model, "peft_config")
    assert result.report.keys.tied and not any(t.shared for t in result.report.keys.tied)
