"""adapter_load library: peft-identical outputs, coverage of every adapter tensor, QLoRA merge."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import builders  # noqa: E402

from qfinal.adapters.apply import apply_adapters  # noqa: E402
from qfinal.adapters.prepare import AdapterSpec  # noqa: E402
from qfinal.errors import CheckpointError, ConfigError, SourceError  # noqa: E402

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# Measured max |Δlogits| against the fp32 reference (fp32 base + adapter merged by peft) on the tiny
# llama (|logits| up to ~0.53; LoRA with init_lora_weights=False, so ΔW is large), bitsandbytes 0.50.2
# on CPU: nf4 merged, dequantized: 0.078 (0.081 after a forward pass, which makes bitsandbytes round
# absmax to bf16 for its CPU kernel); requantized: 0.111; the nf4 base alone vs the fp32 base: 0.089.
# The dequantized merge adds no error of its own (test_qlora_merge_dequantized_exact), so the bound is
# the base's own quantization error: within 1.5x of it, and 0.3 absolute.
NF4_MERGED_ATOL = 0.3


def _load(path, **kwargs):
    return builders.model_class_for(path).from_pretrained(path, **kwargs).eval()


def _nf4(path):
    return _load(path, quantization_config=tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS["nf4"]))


@torch.no_grad()
def _logits(model):
    inputs = builders.probe_inputs(model)
    return model(**inputs).logits


def _make_adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    model = _load(base)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out)
    return out


def _keys(adapter: Path) -> list[str]:
    return sorted(load_file(str(adapter / "adapter_model.safetensors")))


def _errors(findings, check="adapter_coverage"):
    return [f for f in findings if f.check == check and f.severity == "error"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Tiny bases and real peft adapters, built once."""
    root = tmp_path_factory.mktemp("adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = {}
        ns["llama"] = builders.llama(root / "llama", tied=False)
        ns["gpt2"] = builders.gpt2(root / "gpt2")
        ns["bert"] = builders.bert(root / "bert")
        ns["llama_lora"] = _make_adapter(
            ns["llama"], root / "llama_lora", 1, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"]
        )
        ns["llama_lora2"] = _make_adapter(
            ns["llama"], root / "llama_lora2", 2, task_type="CAUSAL_LM", target_modules=["k_proj", "o_proj"]
        )
        ns["gpt2_lora"] = _make_adapter(
            ns["gpt2"], root / "gpt2_lora", 3, task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"]
        )
        ns["bert_lora"] = _make_adapter(
            ns["bert"],
            root / "bert_lora",
            4,
            target_modules=["query", "value"],
            modules_to_save=["cls.predictions.transform.dense"],
        )
        ns["llama_partial_targets"] = _make_adapter(
            ns["llama"], root / "llama_partial_targets", 5, task_type="CAUSAL_LM", target_modules=["q_proj", "c_attn"]
        )
    # partially renamed: layer 0's q_proj tensors under another module name
    renamed = root / "llama_renamed"
    shutil.copytree(ns["llama_lora"], renamed)
    tensors = load_file(str(renamed / "adapter_model.safetensors"))
    ns["renamed_keys"] = sorted(
        k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.query")
        for k in tensors
        if "layers.0.self_attn.q_proj" in k
    )
    tensors = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.query"): v for k, v in tensors.items()}
    save_file(tensors, str(renamed / "adapter_model.safetensors"), metadata={"format": "pt"})
    ns["llama_renamed"] = renamed
    # the same adapter as a pickle only
    pickled = root / "llama_pickle"
    pickled.mkdir()
    shutil.copy(ns["llama_lora"] / "adapter_config.json", pickled)
    torch.save(load_file(str(ns["llama_lora"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    ns["llama_pickle"] = pickled
    # alpha halved in the config: what scale=0.5 must equal
    half = root / "llama_half_alpha"
    shutil.copytree(ns["llama_lora"], half)
    cfg = json.loads((half / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 0.5
    (half / "adapter_config.json").write_text(json.dumps(cfg))
    ns["llama_half_alpha"] = half
    # a task type that does not fit a causal LM
    seq2seq = root / "llama_seq2seq_task"
    shutil.copytree(ns["llama_lora"], seq2seq)
    cfg = json.loads((seq2seq / "adapter_config.json").read_text())
    cfg["task_type"] = "SEQ_2_SEQ_LM"
    (seq2seq / "adapter_config.json").write_text(json.dumps(cfg))
    ns["llama_seq2seq_task"] = seq2seq
    ns["root"] = root
    return ns


# ------------------------------------------------------------------------------------------
# plain bases: bit-identical to peft
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_unmerged_equals_peft_from_pretrained(w, arch):
    adapter = w[f"{arch}_lora"]
    model, records, findings = apply_adapters(_load(w[arch]), [AdapterSpec(str(adapter))])
    reference = PeftModel.from_pretrained(_load(w[arch]), str(adapter))
    assert isinstance(model, PeftModel)
    assert torch.equal(_logits(model), _logits(reference))
    assert not torch.equal(_logits(model), _logits(_load(w[arch]))), "the adapter must not be a no-op"
    (record,) = records
    assert record.name == f"{arch}_lora"
    assert record.matched == len(_keys(adapter))
    assert record.unused == [] and record.unmatched_targets == []
    assert not record.merged
    assert not [f for f in findings if f.severity != "info"], findings
    if arch == "bert":
        assert record.modules_to_save == ["cls.predictions.transform.dense"]
        assert record.task_type is None
    else:
        assert record.task_type == "CAUSAL_LM"
        assert record.base_model_name_or_path == str(w[arch])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_peft_merge_and_unload(w, arch):
    adapter = w[f"{arch}_lora"]
    model, (record,), findings = apply_adapters(_load(w[arch]), [AdapterSpec(str(adapter), merge=True)])
    reference = PeftModel.from_pretrained(_load(w[arch]), str(adapter)).merge_and_unload()
    assert type(model) is type(reference) and not isinstance(model, PeftModel)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(_logits(model), _logits(reference))
    assert record.merged and record.matched == len(_keys(adapter))
    merge_info = [f for f in findings if f.check == "adapter_merge"]
    assert merge_info and "merge_and_unload" in merge_info[0].message


def test_two_named_adapters(w):
    specs = [AdapterSpec(str(w["llama_lora"]), name="a"), AdapterSpec(str(w["llama_lora2"]), name="b")]
    model, records, findings = apply_adapters(_load(w["llama"]), specs)
    reference = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_lora"]), adapter_name="a")
    reference.load_adapter(str(w["llama_lora2"]), adapter_name="b")
    assert set(model.peft_config) == {"a", "b"} and model.active_adapter == "a"
    assert torch.equal(_logits(model), _logits(reference))
    model.set_adapter("b")
    reference.set_adapter("b")
    assert torch.equal(_logits(model), _logits(reference))
    assert [r.name for r in records] == ["a", "b"]
    assert [r.matched for r in records] == [len(_keys(w["llama_lora"])), len(_keys(w["llama_lora2"]))]
    assert not _errors(findings)
    assert any(f.check == "adapter_load" and "'b'" in f.message for f in findings)


def test_merged_and_unmerged_mix(w):
    # the merged one is folded into the base first, the unmerged one is loaded on top
    specs = [AdapterSpec(str(w["llama_lora2"]), name="b"), AdapterSpec(str(w["llama_lora"]), name="a", merge=True)]
    model, records, _ = apply_adapters(_load(w["llama"]), specs)
    merged = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_lora"]), adapter_name="a").merge_and_unload()
    reference = PeftModel.from_pretrained(merged, str(w["llama_lora2"]), adapter_name="b")
    assert set(model.peft_config) == {"b"}
    assert torch.equal(_logits(model), _logits(reference))
    assert [(r.name, r.merged) for r in records] == [("b", False), ("a", True)]


def test_scale_uses_peft_scaling(w):
    model, _, findings = apply_adapters(_load(w["llama"]), [AdapterSpec(str(w["llama_lora"]), scale=0.5)])
    reference = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_half_alpha"]))
    assert torch.equal(_logits(model), _logits(reference))
    assert model.peft_config["llama_lora"].lora_alpha == 4.0  # persisted for save_pretrained
    assert any(f.check == "adapter_scale" for f in findings)
    zero, _, _ = apply_adapters(_load(w["llama"]), [AdapterSpec(str(w["llama_lora"]), scale=0.0)])
    assert torch.equal(_logits(zero), _logits(_load(w["llama"])))


# ------------------------------------------------------------------------------------------
# coverage: the silent failures
# ------------------------------------------------------------------------------------------


def test_adapter_for_another_architecture(w):
    base = _load(w["llama"])
    before = _logits(base)
    model, (record,), findings = apply_adapters(base, [AdapterSpec(str(w["gpt2_lora"]))])
    assert not isinstance(model, PeftModel)  # nothing could be injected: the base is returned untouched
    assert torch.equal(_logits(model), before)
    assert record.matched == 0
    assert record.unused == _keys(w["gpt2_lora"])
    assert record.unmatched_targets == ["c_attn", "c_fc"]
    errors = _errors(findings)
    assert len(errors) == 2 and all(f.key == "gpt2_lora" for f in errors)
    base_warnings = [f for f in findings if f.check == "adapter_base" and f.severity == "warning"]
    assert base_warnings and "model_type gpt2 vs llama" in base_warnings[0].message


def test_foreign_adapter_after_a_good_one(w):
    specs = [AdapterSpec(str(w["llama_lora"])), AdapterSpec(str(w["gpt2_lora"]))]
    model, (good, bad), findings = apply_adapters(_load(w["llama"]), specs)
    assert set(model.peft_config) == {"llama_lora"}  # peft rolled the failed one back
    reference = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_lora"]))
    assert torch.equal(_logits(model), _logits(reference))
    assert good.matched == 12 and not good.unused
    assert bad.matched == 0 and bad.unused == _keys(w["gpt2_lora"])
    assert {f.key for f in _errors(findings)} == {"gpt2_lora"}


def test_partially_renamed_keys(w):
    model, (record,), findings = apply_adapters(_load(w["llama"]), [AdapterSpec(str(w["llama_renamed"]))])
    total = len(_keys(w["llama_renamed"]))
    assert record.unused == w["renamed_keys"]
    assert record.matched == total - len(w["renamed_keys"])
    assert record.unmatched_targets == []
    messages = " ".join(f.message for f in _errors(findings))
    assert "2 of 12 tensor(s) unused" in messages
    assert "layers.0.self_attn.q_proj.lora_A.weight" in messages  # injected but never filled
    # peft's own report, where it has one (load_adapter), names the same keys
    host = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_lora2"]))
    native = host.load_adapter(str(w["llama_renamed"]), adapter_name="renamed")
    assert sorted(native.unexpected_keys) == w["renamed_keys"]
    assert len(native.missing_keys) == len(w["renamed_keys"])


def test_shape_mismatch_is_reported_not_raised(w, tmp_path):
    # a "renamed base": same module names, another intermediate_size
    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**builders.LLAMA, "intermediate_size": 96}, tie_word_embeddings=False)
    base = tf.LlamaForCausalLM(config).eval()
    _, (record,), findings = apply_adapters(base, [AdapterSpec(str(w["llama_lora"]))])
    expected = [k for k in _keys(w["llama_lora"]) if "down_proj.lora_A" in k]
    assert record.unused == expected and record.matched == 12 - len(expected)
    messages = " ".join(f.message for f in _errors(findings))
    assert "shape [4, 128] in the adapter, [4, 96] in the model" in messages
    assert "keep their initialization" in messages
    assert any(f.check == "adapter_base" and "intermediate_size 128 vs 96" in f.message for f in findings)


def test_target_that_matches_nothing(w):
    _, (record,), findings = apply_adapters(_load(w["llama"]), [AdapterSpec(str(w["llama_partial_targets"]))])
    assert record.unmatched_targets == ["c_attn"]
    assert record.unused == [] and record.matched == len(_keys(w["llama_partial_targets"]))
    (error,) = _errors(findings)
    assert "c_attn" in error.message


def test_task_type_that_does_not_fit(w):
    _, (record,), findings = apply_adapters(_load(w["llama"]), [AdapterSpec(str(w["llama_seq2seq_task"]))])
    assert record.task_type == "SEQ_2_SEQ_LM"
    assert any(f.check == "adapter_base" and f.severity == "warning" and "SEQ_2_SEQ_LM" in f.message for f in findings)
    assert not _errors(findings)


# ------------------------------------------------------------------------------------------
# input errors
# ------------------------------------------------------------------------------------------


def test_input_errors(w, tmp_path):
    base = _load(w["llama"])
    empty = tmp_path / "not_an_adapter"
    empty.mkdir()
    with pytest.raises(SourceError, match="adapter_config.json") as exc:
        apply_adapters(base, [AdapterSpec(str(empty))])
    assert str(empty) in str(exc.value)
    with pytest.raises(SourceError, match="does not exist"):
        apply_adapters(base, [AdapterSpec(str(tmp_path / "nowhere"))])
    with pytest.raises(CheckpointError, match="pickle"):
        apply_adapters(base, [AdapterSpec(str(w["llama_pickle"]))])
    with pytest.raises(ConfigError, match="used twice"):
        apply_adapters(
            base, [AdapterSpec(str(w["llama_lora"]), name="x"), AdapterSpec(str(w["llama_lora2"]), name="x")]
        )
    with pytest.raises(ConfigError):
        apply_adapters(base, [AdapterSpec(str(w["llama_lora"]), name="a.b")])
    with pytest.raises(ConfigError, match="ModuleDict"):
        apply_adapters(base, [AdapterSpec(str(w["llama_lora"]), name="keys")])
    # nothing above touched the base
    assert not any("lora" in n for n, _ in base.named_modules())


def test_pickle_allowed_and_default_names(w):
    specs = [
        AdapterSpec(str(w["llama_pickle"])),
        AdapterSpec(str(w["llama_lora"])),
        AdapterSpec(str(w["llama_lora"]) + "/"),
    ]
    model, records, findings = apply_adapters(_load(w["llama"]), specs, allow_pickle=True)
    assert [r.name for r in records] == ["llama_pickle", "llama_lora", "llama_lora_2"]
    reference = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_lora"]))
    assert torch.equal(_logits(model), _logits(reference))
    assert all(r.matched == 12 and not r.unused for r in records)


# ------------------------------------------------------------------------------------------
# QLoRA: nf4 base quantized on the fly
# ------------------------------------------------------------------------------------------


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def qlora(w):
    adapter = str(w["llama_lora"])
    fp32_base = _logits(_load(w["llama"]))
    fp32_unmerged = _logits(PeftModel.from_pretrained(_load(w["llama"]), adapter))
    fp32_merged = _logits(PeftModel.from_pretrained(_load(w["llama"]), adapter).merge_and_unload())
    return dict(
        adapter=adapter,
        fp32_base=fp32_base,
        fp32_unmerged=fp32_unmerged,
        fp32_merged=fp32_merged,
        nf4_base=_logits(_nf4(w["llama"])),
        nf4_unmerged=_logits(PeftModel.from_pretrained(_nf4(w["llama"]), adapter)),
    )


def test_qlora_unmerged_loads_and_runs(w, qlora):
    model, (record,), findings = apply_adapters(_nf4(w["llama"]), [AdapterSpec(qlora["adapter"])])
    reference = PeftModel.from_pretrained(_nf4(w["llama"]), qlora["adapter"])
    logits = _logits(model)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, _logits(reference))
    assert record.matched == 12 and not record.unused and not _errors(findings)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    print(f"\nQLoRA unmerged vs fp32 unmerged: max|Δlogits| = {_max_diff(logits, qlora['fp32_unmerged']):.4g}")


@pytest.mark.parametrize("forward_first", [False, True])
def test_qlora_merge_dequantized(w, qlora, forward_first):
    base = _nf4(w["llama"])
    if forward_first:  # bitsandbytes repacks 4-bit weights for CPU kernels on the first forward
        _logits(base)
    model, (record,), findings = apply_adapters(base, [AdapterSpec(qlora["adapter"], merge=True)])
    assert record.merged
    assert not any(type(p).__name__ == "Params4bit" for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None
    info = [f.message for f in findings if f.check == "adapter_merge"]
    assert any("dequantized from nf4 to float32" in m for m in info), info
    diff = _max_diff(_logits(model), qlora["fp32_merged"])
    base_error = _max_diff(qlora["nf4_base"], qlora["fp32_base"])
    runtime = _max_diff(_logits(model), qlora["nf4_unmerged"])
    print(
        f"\nnf4 merged (dequantized, forward_first={forward_first}) vs fp32 merged: max|Δlogits| = {diff:.4g}"
        f" (nf4 base vs fp32 base: {base_error:.4g}; |logits| max {qlora['fp32_merged'].abs().max().item():.3g};"
        f" vs the unmerged QLoRA runtime: {runtime:.4g})"
    )
    assert diff <= NF4_MERGED_ATOL
    assert diff <= 1.5 * base_error + 1e-3


def test_qlora_merge_dequantized_exact(w):
    """merged weight == dequant(W) + peft's ΔW, bit for bit: the merge itself adds no error."""
    adapter = str(w["llama_lora"])
    dequantized = _nf4(w["llama"]).dequantize()
    expected = PeftModel.from_pretrained(dequantized, adapter).merge_and_unload().state_dict()
    model, _, _ = apply_adapters(_nf4(w["llama"]), [AdapterSpec(adapter, merge=True)])
    ours = model.state_dict()
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


def test_qlora_merge_requantized(w, qlora):
    model, (record,), findings = apply_adapters(
        _nf4(w["llama"]), [AdapterSpec(qlora["adapter"], merge=True)], requantize=True
    )
    assert record.merged and not isinstance(model, PeftModel)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight).__name__ == "Params4bit"
    info = [f.message for f in findings if f.check == "adapter_merge"]
    assert any("quantize again" in m for m in info), info
    diff = _max_diff(_logits(model), qlora["fp32_merged"])
    print(f"\nnf4 merged (requantized) vs fp32 merged: max|Δlogits| = {diff:.4g}")
    assert diff <= NF4_MERGED_ATOL


@pytest.mark.parametrize("requantize", [False, True])
def test_int8_merge(w, qlora, requantize):
    base = _load(w["llama"], quantization_config=tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS["int8"]))
    model, (record,), findings = apply_adapters(
        base, [AdapterSpec(qlora["adapter"], merge=True)], requantize=requantize
    )
    assert record.merged and record.matched == 12
    kinds = {type(p).__name__ for p in model.parameters()}
    assert ("Int8Params" in kinds) == requantize
    diff = _max_diff(_logits(model), qlora["fp32_merged"])
    print(f"\nint8 merged (requantize={requantize}) vs fp32 merged: max|Δlogits| = {diff:.4g}")
    assert diff <= 0.05


# ------------------------------------------------------------------------------------------
# through the pipeline and the CLI
# ------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _yaml(tmp_path, *adapters: Path, merge: bool = False) -> Path:
    config = tmp_path / "adapters.yaml"
    config.write_text(
        "adapters:\n" + "".join(f"  - path: {json.dumps(str(a))}\n    merge: {str(merge).lower()}\n" for a in adapters)
    )
    return config


@pytest.mark.parametrize("adapter", ["gpt2_lora", "llama_renamed"])
def test_validate_fails_on_foreign_adapter(w, tmp_path, capsys, adapter):
    code, report = builders.run_json(capsys, "validate", w["llama"], "--config", _yaml(tmp_path, w[adapter]))
    assert code == 1
    assert report["ok"] is False
    assert "adapter_coverage" in builders.failing_checks(report)
    (record,) = report["adapters"]
    assert record["name"] == adapter and record["path"] == str(w[adapter])
    if adapter == "gpt2_lora":  # another architecture: nothing lands
        assert record["unused"] == _keys(w["gpt2_lora"])
        assert record["matched"] == 0
        assert record["unmatched_targets"] == ["c_attn", "c_fc"]
    else:  # renamed keys: the renamed ones, and only those, are unused
        assert record["unused"] == w["renamed_keys"]
        assert record["matched"] == len(_keys(w[adapter])) - len(w["renamed_keys"])
        assert record["unmatched_targets"] == []
    # the same command with the adapter made for this base passes
    (tmp_path / "good").mkdir()
    good = _yaml(tmp_path / "good", w["llama_lora"])
    code, report = builders.run_json(capsys, "validate", w["llama"], "--config", good)
    assert code == 0 and report["adapters"][0]["unused"] == [] and report["adapters"][0]["matched"] == 12


@pytest.fixture(scope="module")
def seq_cls(w):
    """A real peft SEQ_CLS LoRA: peft adds `score` (the classification head) to modules_to_save."""
    root = w["root"]
    torch.manual_seed(11)
    config = tf.LlamaConfig(**builders.LLAMA, tie_word_embeddings=False, num_labels=3, pad_token_id=0)
    tf.LlamaForSequenceClassification(config).save_pretrained(root / "llama_cls")
    base = _load(root / "llama_cls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            base,
            LoraConfig(
                task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
            ),
        )
    peft_model.save_pretrained(root / "llama_seq_cls")
    return dict(base=root / "llama_cls", adapter=root / "llama_seq_cls")


def test_adapter_for_another_task(w, seq_cls, tmp_path, capsys):
    adapter = seq_cls["adapter"]
    keys = _keys(adapter)
    head = ["base_model.model.score.weight"]
    assert set(head) < set(keys)  # peft saved the head through modules_to_save
    # on the base it was made for: everything lands
    model, (record,), findings = apply_adapters(_load(seq_cls["base"]), [AdapterSpec(str(adapter))])
    assert record.matched == len(keys) and record.unused == [] and not _errors(findings)
    assert not [f for f in findings if f.check == "adapter_base"]
    # on the causal LM of the same config: the LoRA tensors land, the head has nowhere to go
    model, (record,), findings = apply_adapters(_load(w["llama"]), [AdapterSpec(str(adapter))])
    assert type(model).__name__ == "PeftModelForSequenceClassification"  # peft picks the wrapper by task_type
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert record.task_type == "SEQ_CLS"
    assert record.modules_to_save == ["classifier", "score"]
    assert record.unused == head and record.matched == len(keys) - 1
    assert record.unmatched_targets == []
    (error,) = _errors(findings)
    assert "1 of 9 tensor(s) unused" in error.message and "no such module in the base: " + head[0] in error.message
    base_warnings = [f.message for f in findings if f.check == "adapter_base" and f.severity == "warning"]
    assert any("trained for task SEQ_CLS; the base is a LlamaForCausalLM" in m for m in base_warnings), base_warnings
    assert any(
        "architectures ['LlamaForSequenceClassification'] vs ['LlamaForCausalLM']" in m for m in base_warnings
    ), base_warnings
    # under validate: exit 1 on adapter_coverage, the task mismatch in the report
    code, report = builders.run_json(capsys, "validate", w["llama"], "--config", _yaml(tmp_path, adapter))
    assert code == 1 and "adapter_coverage" in builders.failing_checks(report)
    (record,) = report["adapters"]
    assert record["unused"] == head and record["task_type"] == "SEQ_CLS"
    assert record["modules_to_save"] == ["classifier", "score"]
    assert any(
        f["check"] == "adapter_base" and f["severity"] == "warning" and "SEQ_CLS" in f["message"]
        for f in report["findings"]
    )


def test_cli_load_two_adapters_merged(w, capsys, monkeypatch):
    import qfinal.ops.load

    captured = {}
    real_load = qfinal.ops.load.load

    def spy(*args, **kwargs):
        captured["result"] = real_load(*args, **kwargs)
        return captured["result"]

    monkeypatch.setattr(qfinal.ops.load, "load", spy)
    a, b = w["llama_lora"], w["llama_lora2"]
    code, report = builders.run_json(capsys, "load", w["llama"], "--adapter", a, "--adapter", b, "--merge")
    assert code == 0, report["findings"]
    assert [(r["name"], r["path"]) for r in report["adapters"]] == [("llama_lora", str(a)), ("llama_lora2", str(b))]
    for record, adapter in zip(report["adapters"], (a, b)):
        lora_keys = [k for k in _keys(adapter) if ".lora_" in k]
        assert record["matched"] == len(lora_keys) == len(_keys(adapter)) > 0
        assert record["unused"] == [] and record["unmatched_targets"] == []
        assert record["merged"] is True
    model = captured["result"].model
    assert not isinstance(model, PeftModel) and not any("lora" in n for n, _ in model.named_modules())
    once = PeftModel.from_pretrained(_load(w["llama"]), str(a)).merge_and_unload()
    only_a = _logits(once)
    reference = PeftModel.from_pretrained(once, str(b)).merge_and_unload()  # merges into `once` in place
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(_logits(model), _logits(reference))
    assert not torch.equal(_logits(model), only_a), "the second adapter must change the output"


def _bnb_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]


@pytest.mark.parametrize("requantize", [False, True])
def test_pipeline_qlora_merge(w, qlora, requantize):
    import qfinal

    result = qfinal.load(
        w["llama"], quantize="nf4", adapters=[{"path": qlora["adapter"], "merge": True}], merge_requantize=requantize
    )
    report, model = result.report, result.model
    assert report.ok, report.failing()
    (record,) = report.adapters
    assert record.merged and record.matched == 12 and record.unused == []
    merge_info = [f.message for f in report.findings if f.check == "adapter_merge"]
    q_proj = model.model.layers[0].self_attn.q_proj
    if requantize:
        assert type(q_proj).__name__ == "Linear4bit" and type(q_proj.weight).__name__ == "Params4bit"
        assert not any("dequantized before merging" in m for m in merge_info), merge_info
        assert any("quantize again" in m for m in merge_info), merge_info
        assert report.quantization.startswith("nf4"), report.quantization
    else:
        assert _bnb_modules(model) == []
        assert not any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())
        assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
        assert any("quantized base dequantized before merging" in m for m in merge_info), merge_info
        assert report.quantization == "none (dequantized to merge adapters)"
    diff = _max_diff(_logits(model), qlora["fp32_merged"])
    print(f"\npipeline nf4 merged (requantize={requantize}) vs fp32 merged: max|Δlogits| = {diff:.4g}")
    assert diff <= NF4_MERGED_ATOL
    if not requantize:  # as in the library: the dequantized merge adds no error beyond the base's own
        assert diff <= 1.5 * _max_diff(qlora["nf4_base"], qlora["fp32_base"]) + 1e-3
    assert not torch.equal(_logits(model), qlora["fp32_merged"])  # it really went through nf4


def test_example_config_lora_merge(w, tmp_path, monkeypatch, capsys):
    import qfinal

    (tmp_path / "configs").mkdir()
    example = shutil.copy(REPO / "configs" / "lora-merge.yaml", tmp_path / "configs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the example's `path: ./my-lora` is relative to the YAML's folder, not here
    shutil.copytree(w["llama_lora"], tmp_path / "configs" / "my-lora")
    result = qfinal.load(w["llama"], example)
    assert result.report.ok, result.report.failing()
    (record,) = result.report.adapters
    assert (record.name, record.path, record.merged, record.matched) == (
        "my-lora",
        str(tmp_path / "configs" / "my-lora"),
        True,
        12,
    )
    assert record.unused == [] and record.unmatched_targets == []
    reference = PeftModel.from_pretrained(_load(w["llama"]), str(w["llama_lora"])).merge_and_unload()
    assert not isinstance(result.model, PeftModel)
    assert torch.equal(_logits(result.model), _logits(reference))
    # what its comment promises: an adapter that does not fit fails the adapter_coverage check (exit 1)
    shutil.rmtree(tmp_path / "configs" / "my-lora")
    shutil.copytree(w["gpt2_lora"], tmp_path / "configs" / "my-lora")
    code, report = builders.run_json(capsys, "validate", w["llama"], "--config", example)
    assert code == 1 and "adapter_coverage" in builders.failing_checks(report)
    assert report["adapters"][0]["unused"] == _keys(w["gpt2_lora"])


def test_validate_takes_the_adapter_options_of_load(w, capsys):
    """The CI gate checks "this base plus this adapter" without a YAML file."""
    code, report = builders.run_json(capsys, "validate", w["llama"], "--adapter", w["llama_lora"], "--merge")
    assert code == 0, builders.failing_checks(report)
    (record,) = report["adapters"]
    assert (record["merged"], record["matched"], record["unused"]) == (True, 12, [])
    assert "adapter_coverage" in report["checks"]
    code, report = builders.run_json(capsys, "validate", w["llama"], "--adapter", w["gpt2_lora"])
    assert code == 1 and "adapter_coverage" in builders.failing_checks(report)


def test_an_adapter_load_prints_no_third_party_warning(w):
    """transformers' `is_gradient_checkpointing` FutureWarning (and the like) never reach stderr, even
    without --quiet; --debug lets them through."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1"}
    env.pop("QFINAL_DEBUG", None)
    argv = [sys.executable, "-m", "qfinal", "load", str(w["llama"]), "--adapter", str(w["llama_lora"]), "--merge"]
    quiet = subprocess.run(argv + ["--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    shown = subprocess.run(argv + ["--json", os.devnull], capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0 and "Warning" not in shown.stderr, shown.stderr
    debug = subprocess.run(
        [argv[0], "-m", "qfinal", "--debug", *argv[3:], "--quiet"], capture_output=True, text=True, env=env, timeout=300
    )
    assert debug.returncode == 0 and "FutureWarning" in debug.stderr
