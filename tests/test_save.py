"""qfinal save: the saved folder reloads, through qfinal and plain transformers, to the same model."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import builders
import qfinal
import qfinal.saving as saving
from qfinal.cli import main


def checks_by_name(report):
    out = {}
    for f in report.findings:
        out.setdefault(f.check, []).append(f)
    return out


def assert_round_trip_proven(report, out):
    assert report.ok, [f for f in report.findings if f.severity == "error"]
    by_name = checks_by_name(report)
    for check in ("roundtrip_keys", "roundtrip_tensors", "roundtrip_ties", "roundtrip_config", "roundtrip_logits"):
        messages = [f.message for f in by_name.get(check, [])]
        assert any(m.startswith("qfinal reload") for m in messages), check
        assert any(m.startswith("transformers reload") for m in messages), check
    assert (out / "config.json").is_file()
    assert not list(out.parent.glob(f".{out.name}.qfinal-tmp-*"))


@pytest.mark.parametrize("fixture,options", [
    ("llama_tied", {}),
    ("t5", {}),
    ("llama_tied", {"quantize": "nf4"}),
    ("gpt2", {"quantize": "nf4"}),
    ("llama_sharded", {"quantize": "fp4", "double_quant": True}),
    ("llama_untied", {"quantize": "int8"}),
    ("gpt2", {"quantize": "int8"}),
])
def test_save_round_trip(checkpoints, tmp_path, fixture, options):
    out = tmp_path / "out"
    report = qfinal.save(checkpoints[fixture], out, max_shard_size="100KB", **options)
    assert_round_trip_proven(report, out)
    assert report.extra["save"]["writer"] == "save_pretrained"


@pytest.mark.parametrize("method", ["nf4", "fp4_dq", "int8"])
@pytest.mark.parametrize("fixture", ["llama_tied", "gpt2"])
def test_save_prequantized_checkpoint(checkpoints, tmp_path, fixture, method):
    """transformers cannot save_pretrained a model loaded from a bnb checkpoint; qfinal can."""
    source = checkpoints.quantized(fixture, method)
    reference = builders.model_class_for(source).from_pretrained(source)
    with pytest.raises(NotImplementedError):
        reference.save_pretrained(tmp_path / "transformers-fails")

    out = tmp_path / "out"
    report = qfinal.save(source, out)
    assert_round_trip_proven(report, out)
    assert report.extra["save"]["writer"].startswith("qfinal writer")
    # The saved files hold exactly what transformers wrote when it quantized on the fly.
    original, saved = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == saved.keys()
    assert all(torch.equal(original[k], saved[k]) for k in original)


@pytest.mark.parametrize("fixture", ["llama_tied", "gpt2"])
def test_save_dequantized(checkpoints, tmp_path, fixture):
    source = checkpoints.quantized(fixture, "nf4")
    out = tmp_path / "out"
    report = qfinal.save(source, out, dequantize=True, dtype="float16")
    assert_round_trip_proven(report, out)
    plain = builders.model_class_for(out).from_pretrained(out)
    assert "quantization_config" not in plain.config.to_dict()
    floats = {t.dtype for t in plain.state_dict().values() if t.is_floating_point()}
    assert floats == {torch.float16}


def test_tokenizer_and_generation_files_are_copied(checkpoints, tmp_path):
    source = tmp_path / "src"
    builders.llama(source)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "out"
    report = qfinal.save(source, out)
    assert report.ok
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert (out / "generation_config.json").is_file()


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr()


def test_tensor_changed_after_saving_fails_the_round_trip(checkpoints, tmp_path, monkeypatch, capsys):
    real_write = saving.write_model

    def write_then_corrupt(result, folder, max_bytes):
        writer = real_write(result, folder, max_bytes)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
        save_file(tensors, path, metadata={"format": "pt"})
        return writer

    monkeypatch.setattr(saving, "write_model", write_then_corrupt)
    out = tmp_path / "out"
    code, captured = _run(["save", str(checkpoints["llama_untied"]), str(out), "--json", "-"], capsys)
    assert code == 1
    assert "model.norm.weight" in captured.out and "roundtrip_tensors" in captured.out
    assert not out.exists()
    assert not list(tmp_path.glob(".out.qfinal-tmp-*"))


def test_tie_broken_before_saving_fails_the_round_trip(checkpoints, tmp_path, monkeypatch):
    real_write = saving.write_model

    def untie_then_write(result, folder, max_bytes):
        model = result.model
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        return real_write(result, folder, max_bytes)

    monkeypatch.setattr(saving, "write_model", untie_then_write)
    report = qfinal.save(checkpoints["llama_tied"], tmp_path / "out")
    failed = {f.check for f in report.findings if f.severity == "error"}
    assert "roundtrip_ties" in failed
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, captured = _run(["save", str(checkpoints["llama_untied"]), str(out)], capsys)
    assert code == 2
    assert "already exists" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert (out / "keep.txt").exists()

    code, _ = _run(["save", str(checkpoints["llama_untied"]), str(out), "--force", "--quiet"], capsys)
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert torch.equal(tf.LlamaForCausalLM.from_pretrained(out).lm_head.weight,
                       tf.LlamaForCausalLM.from_pretrained(checkpoints["llama_untied"]).lm_head.weight)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, checkpoints):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = builders.model_class_for(checkpoints["llama_tied"]).from_pretrained(checkpoints["llama_tied"])
    path = tmp_path_factory.mktemp("adapters") / "my-lora"
    get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
                   ).save_pretrained(path)
    return path


@pytest.mark.parametrize("options", [{}, {"quantize": "nf4"}])
def test_save_with_unmerged_adapter_writes_base_and_peft_folder(checkpoints, lora, tmp_path, options):
    out = tmp_path / "out"
    report = qfinal.save(checkpoints["llama_tied"], out, adapters=[{"path": str(lora)}], **options)
    assert_round_trip_proven(report, out)
    assert (out / "adapters" / "my-lora" / "adapter_config.json").is_file()
    saved_keys = load_file(out / "model.safetensors").keys()
    assert not any("lora_" in k or "base_layer" in k for k in saved_keys)
    # The saved base is the base: plain transformers reloads it with nothing missing.
    _, info = builders.model_class_for(out).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_save_with_merged_adapter_bakes_it_into_the_weights(checkpoints, lora, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    report = qfinal.save(checkpoints["llama_tied"], out, adapters=[{"path": str(lora), "merge": True}])
    assert_round_trip_proven(report, out)
    assert not (out / "adapters").exists()
    base = builders.model_class_for(checkpoints["llama_tied"]).from_pretrained(checkpoints["llama_tied"])
    merged = PeftModel.from_pretrained(base, lora).merge_and_unload()
    saved = tf.LlamaForCausalLM.from_pretrained(out)
    for key, value in merged.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
