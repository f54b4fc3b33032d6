"""Every peft adapter type for a causal LM: loads as peft loads it, merges as `merge_and_unload` does,
or is refused before loading when it cannot merge. Fixtures are made with peft here, one per type,
with non-trivial weights; logits are compared bit for bit."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import builders  # noqa: E402

import qfinal  # noqa: E402
from qfinal.adapters.apply import apply_adapters  # noqa: E402
from qfinal.adapters.prepare import AdapterSpec  # noqa: E402
from qfinal.errors import ConfigError  # noqa: E402

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

LIN = ["q_proj", "v_proj", "down_proj"]
WRAPPED = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
TOKENS = 5
CONFIGS = {  # type -> (peft config, peft_type, variants)
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN), "LORA", []),
    "dora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, use_dora=True), "LORA", ["DoRA"]),
    "rslora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, use_rslora=True), "LORA", ["rsLoRA"]),
    # AdaLoRA's config refuses total_step None, even for inference
    "adalora": (
        lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=LIN, total_step=100),
        "ADALORA",
        [],
    ),
    "ia3": (lambda: peft.IA3Config(target_modules=LIN, feedforward_modules=["down_proj"]), "IA3", []),
    "loha": (lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=LIN), "LOHA", []),
    "lokr": (lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=LIN), "LOKR", []),
    "prompt_tuning": (lambda: peft.PromptTuningConfig(num_virtual_tokens=TOKENS), "PROMPT_TUNING", []),
    "prefix_tuning": (lambda: peft.PrefixTuningConfig(num_virtual_tokens=TOKENS), "PREFIX_TUNING", []),
    "p_tuning": (lambda: peft.PromptEncoderConfig(num_virtual_tokens=TOKENS, encoder_hidden_size=32), "P_TUNING", []),
}
PROMPT = ["prompt_tuning", "prefix_tuning", "p_tuning"]
MERGEABLE = [k for k in CONFIGS if k not in PROMPT]
NO_BNB_MERGE = ["adalora", "ia3", "loha", "lokr"]  # peft's merge into bitsandbytes weights fails
NO_BNB_4BIT = ["loha", "lokr"]  # peft's layers cannot run on a 4-bit base at all


def _base(path, **kwargs):
    return tf.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _nf4(path):
    return _base(path, quantization_config=tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS["nf4"]))


def _dequantized_nf4(path):
    model = _nf4(path)
    model = model.dequantize() or model
    model.is_loaded_in_4bit = False  # transformers leaves the flag set; peft's IA3 merge reads it
    return model


@torch.no_grad()
def _logits(model):
    model.eval()
    return model(**builders.probe_inputs(model)).logits


def _peft(base_model, adapter):
    return PeftModel.from_pretrained(base_model, str(adapter))


def _make(base: Path, out: Path, kind: str, seed: int) -> Path:
    """A real peft adapter of `kind`, every trainable tensor random (LoRA's B, AdaLoRA's E and the
    prompt embeddings start at zero or near it; IA3's vectors at one)."""
    torch.manual_seed(seed)
    config = CONFIGS[kind][0]()
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(_base(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(1.0 + noise if "ia3_l" in name else noise)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_types")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = {"llama": builders.llama(root / "llama", tied=False)}
        for seed, kind in enumerate(CONFIGS, start=1):
            ns[kind] = _make(ns["llama"], root / f"adapter_{kind}", kind, seed)
    ns["base_logits"] = _logits(_base(ns["llama"]))
    return ns


def _load(w, *adapters, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qfinal.load(w["llama"], adapters=list(adapters), **options)


# ------------------------------------------------------------------------------------------
# unmerged: every type, as peft loads it
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_loads_as_peft(w, kind):
    result = _load(w, {"path": str(w[kind])})
    reference = _peft(_base(w["llama"]), w[kind])
    ours, theirs = _logits(result.model), _logits(reference)
    assert torch.equal(ours, theirs)
    assert ours.shape != w["base_logits"].shape or not torch.equal(ours, w["base_logits"]), "a no-op adapter"
    assert result.report.ok, result.report.failing()
    (record,) = result.report.adapters
    _, peft_type, variants = CONFIGS[kind]
    assert (record.peft_type, record.variants, record.merged) == (peft_type, variants, False)
    assert record.matched == len(load_file(str(w[kind] / "adapter_model.safetensors"))) and record.unused == []
    if kind in PROMPT:
        assert (record.virtual_tokens, record.wrapped_modules) == (TOKENS, [])
    else:
        assert (record.virtual_tokens, record.wrapped_modules) == (0, WRAPPED)


# ------------------------------------------------------------------------------------------
# merged: the types that can, as merge_and_unload does; the others refused before loading
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MERGEABLE)
def test_merges_as_peft(w, kind):
    result = _load(w, {"path": str(w[kind]), "merge": True})
    reference = _peft(_base(w["llama"]), w[kind]).merge_and_unload()
    assert not isinstance(result.model, PeftModel)
    ours, theirs = result.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(_logits(result.model), _logits(reference))
    (record,) = result.report.adapters
    assert record.merged and record.wrapped_modules == WRAPPED and record.peft_type == CONFIGS[kind][1]


@pytest.mark.parametrize("kind", PROMPT)
def test_merge_refused_before_loading(w, kind, capsys, monkeypatch):
    with pytest.raises(AttributeError):  # what peft does when asked
        _peft(_base(w["llama"]), w[kind]).merge_and_unload()
    code, out, err = builders.run_cli(capsys, "load", w["llama"], "--adapter", w[kind], "--merge")
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert str(w[kind]) in line and f"'adapter_{kind}'" in line and CONFIGS[kind][1] in line
    assert f"{TOKENS} virtual tokens" in line and "without --merge" in line
    # refused from adapter_config.json: no stage ran, no adapter tensor was read
    import qfinal.adapters.prepare

    def no_read(*args, **kwargs):
        raise AssertionError("adapter tensors read")

    monkeypatch.setattr(qfinal.adapters.prepare, "read_tensors", no_read)
    stages = []
    with pytest.raises(ConfigError, match="cannot merge"):
        qfinal.load(w["llama"], adapters=[{"path": str(w[kind]), "merge": True}], on_stage=stages.append)
    assert stages == []
    with pytest.raises(ConfigError, match="cannot merge"):  # the library entry point checks too
        apply_adapters(_base(w["llama"]), [AdapterSpec(str(w[kind]), merge=True)])


# ------------------------------------------------------------------------------------------
# several adapters at once
# ------------------------------------------------------------------------------------------


def test_two_of_one_type_unmerged(w):
    result = _load(w, {"path": str(w["lora"]), "name": "a"}, {"path": str(w["dora"]), "name": "b"})
    reference = PeftModel.from_pretrained(_base(w["llama"]), str(w["lora"]), adapter_name="a")
    reference.load_adapter(str(w["dora"]), adapter_name="b")
    assert torch.equal(_logits(result.model), _logits(reference))
    result.model.set_adapter("b")
    reference.set_adapter("b")
    assert torch.equal(_logits(result.model), _logits(reference))
    assert [(r.name, r.variants) for r in result.report.adapters] == [("a", []), ("b", ["DoRA"])]


@pytest.mark.parametrize("second", ["ia3", "prompt_tuning"])
def test_merged_then_another_type(w, second):
    result = _load(w, {"path": str(w["lora"]), "merge": True}, {"path": str(w[second])})
    merged = _peft(_base(w["llama"]), w["lora"]).merge_and_unload()
    assert torch.equal(_logits(result.model), _logits(_peft(merged, w[second])))
    assert [r.merged for r in result.report.adapters] == [True, False]


def test_unmerged_types_peft_cannot_combine(w):
    host = _peft(_base(w["llama"]), w["lora"])
    with pytest.raises(ValueError, match="different peft types"):
        host.load_adapter(str(w["ia3"]), adapter_name="ia3")
    with pytest.raises(ConfigError, match="different peft types"):
        _load(w, {"path": str(w["lora"])}, {"path": str(w["ia3"])})


# ------------------------------------------------------------------------------------------
# nf4 base
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MERGEABLE)
def test_nf4_merge_dequantized_as_peft(w, kind):
    """Default: the base is dequantized, then peft merges in float (any mergeable type)."""
    result = _load(w, {"path": str(w[kind]), "merge": True}, quantize="nf4")
    reference = _peft(_dequantized_nf4(w["llama"]), w[kind]).merge_and_unload()
    assert torch.equal(_logits(result.model), _logits(reference))


def test_library_nf4_merge_ia3(w):
    """apply_adapters dequantizes with transformers, whose 4-bit flag made peft's IA3 merge refuse."""
    model, (record,), _ = apply_adapters(_nf4(w["llama"]), [AdapterSpec(str(w["ia3"]), merge=True)])
    reference = _peft(_dequantized_nf4(w["llama"]), w["ia3"]).merge_and_unload()
    assert record.merged and torch.equal(_logits(model), _logits(reference))


@pytest.mark.parametrize("kind", ["lora", "dora", *NO_BNB_MERGE])
def test_nf4_merge_requantized(w, kind, capsys):
    """merge_requantize: peft's own merge into the 4-bit weights, where peft has one."""
    if kind not in NO_BNB_MERGE:
        result = _load(w, {"path": str(w[kind]), "merge": True}, quantize="nf4", merge_requantize=True)
        reference = _peft(_nf4(w["llama"]), w[kind]).merge_and_unload()
        assert torch.equal(_logits(result.model), _logits(reference))
        return
    with pytest.raises((ValueError, NotImplementedError, RuntimeError)):
        _peft(_nf4(w["llama"]), w[kind]).merge_and_unload()
    with pytest.raises(ConfigError, match="cannot merge into nf4 weights") as exc:
        _load(w, {"path": str(w[kind]), "merge": True}, quantize="nf4", merge_requantize=True)
    assert "drop merge_requantize" in str(exc.value) and str(w[kind]) in str(exc.value)


@pytest.mark.parametrize("kind", ["lora", "adalora", "ia3", "prompt_tuning", *NO_BNB_4BIT])
def test_nf4_unmerged(w, kind, capsys):
    if kind not in NO_BNB_4BIT:
        result = _load(w, {"path": str(w[kind])}, quantize="nf4")
        assert torch.equal(_logits(result.model), _logits(_peft(_nf4(w["llama"]), w[kind])))
        return
    code, _, err = builders.run_cli(capsys, "load", w["llama"], "--adapter", w[kind], "--quantize", "nf4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot run on a nf4 base" in err
    assert "merge it" in err


# ------------------------------------------------------------------------------------------
# runtime.mode: training — what trains is what peft trains
# ------------------------------------------------------------------------------------------


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "ia3", "loha", "prompt_tuning"])
def test_training_trains_what_peft_trains(w, kind):
    name = f"adapter_{kind}"
    result = _load(w, {"path": str(w[kind])}, runtime={"mode": "training"})
    ours = _trainable(result.model)
    if kind in PROMPT:
        # peft refuses to load a saved prompt-learning adapter trainable; training one is get_peft_model's set-up
        with pytest.raises(ValueError, match="prompt learning adapter to trainable"):
            PeftModel.from_pretrained(_base(w["llama"]), str(w[kind]), adapter_name=name, is_trainable=True)
        config = peft.PeftConfig.from_pretrained(str(w[kind]))
        reference = get_peft_model(_base(w["llama"]), config, adapter_name=name)
    else:
        reference = PeftModel.from_pretrained(_base(w["llama"]), str(w[kind]), adapter_name=name, is_trainable=True)
    assert ours and ours == _trainable(reference)
    assert result.report.extra["parameters"]["trainable"] == sum(
        p.numel() for p in result.model.parameters() if p.requires_grad
    )
