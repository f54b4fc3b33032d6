"""Runtime finalization, the dry-run plan, offload, and idempotency of the finishing stages."""

from __future__ import annotations

import builders
import pytest
import torch

import qfinal
from qfinal.ops.plan import measured_bytes_per_device, plan
from qfinal.pipeline.stages import AdapterLoad, Postprocess, Runtime, TieWeights


def dropout_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_inference_mode_turns_dropout_off(checkpoints):
    model = qfinal.load(checkpoints["gpt2"], runtime={"mode": "inference"}).model
    assert dropout_modules(model) and not any(m.training for m in dropout_modules(model))


def test_training_mode_with_adapter_trains_only_the_adapter(checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = builders.model_class_for(checkpoints["gpt2"]).from_pretrained(checkpoints["gpt2"])
    peft_model = get_peft_model(base, LoraConfig(target_modules=["c_attn"], r=4, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")

    result = qfinal.load(
        checkpoints["gpt2"],
        adapters=[{"path": str(tmp_path / "lora")}],
        runtime={"mode": "training", "gradient_checkpointing": True},
    )
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    expected = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert result.report.extra["parameters"]["trainable"] == expected
    assert all(m.training for m in dropout_modules(model))
    assert model.get_base_model().is_activation_checkpointing


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementation_is_the_one_in_use(checkpoints, attn, monkeypatch):
    """What the report says runs is what a forward pass really calls (spied on, not read back)."""
    from transformers.models.llama import modeling_llama

    result = qfinal.load(checkpoints["llama_tied"], runtime={"attn_implementation": attn})
    assert result.report.extra["attn_implementation"] == attn
    assert any(f.check == "attn_implementation" and f.severity == "info" for f in result.report.findings)

    calls = {"eager": 0, "sdpa": 0}
    real_eager, real_sdpa = modeling_llama.eager_attention_forward, torch.nn.functional.scaled_dot_product_attention

    def eager(*args, **kwargs):
        calls["eager"] += 1
        return real_eager(*args, **kwargs)

    def sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        result.model(**builders.probe_inputs(result.model))
    layers = result.model.config.num_hidden_layers
    assert calls == ({"eager": layers, "sdpa": 0} if attn == "eager" else {"eager": 0, "sdpa": layers})


def test_attention_check_reads_every_attention_module(checkpoints):
    """A module whose config says otherwise than the model's (a sub-config left behind) is caught."""
    import copy

    from qfinal.pipeline.stages.runtime import attention_in_use

    model = qfinal.load(checkpoints["llama_tied"], runtime={"attn_implementation": "sdpa"}).model
    assert attention_in_use(model) == "sdpa"
    odd = copy.copy(model.config)
    odd._attn_implementation = "eager"
    model.model.layers[1].self_attn.config = odd
    assert attention_in_use(model) == "mixed: eager (model.layers.1.self_attn), sdpa"


def test_unavailable_attention_falls_back_with_a_finding(checkpoints):
    result = qfinal.load(checkpoints["llama_tied"], runtime={"attn_implementation": "flash_attention_2"})
    used = result.model.config._attn_implementation
    assert used != "flash_attention_2"
    warning = [f for f in result.report.findings if f.check == "attn_implementation"]
    assert warning and warning[0].severity == "warning" and used in warning[0].message


@pytest.mark.slow
def test_compile_gives_the_same_logits(checkpoints):
    eager = qfinal.load(checkpoints["llama_tied"]).model
    compiled = qfinal.load(checkpoints["llama_tied"], runtime={"compile": {"enabled": True}})
    assert compiled.report.extra["compile_seconds"] > 0
    inputs = builders.probe_inputs(eager)
    with torch.no_grad():
        torch.testing.assert_close(compiled.model(**inputs).logits, eager(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu", ["300KB", "50KB"], ids=["head-in-memory", "all-on-disk"])
def test_ties_survive_offload(checkpoints, tmp_path, cpu):
    """The tie audit runs after dispatch and reads accelerate's offload index; the offloaded model
    computes exactly what the in-memory one does."""
    from qfinal.checks.ties import same_tensor

    plain = qfinal.load(checkpoints["llama_tied"]).model
    result = qfinal.load(
        checkpoints["llama_tied"],
        device_map="auto",
        max_memory={"cpu": cpu, "disk": "10GB"},
        offload_folder=str(tmp_path / "off"),
    )
    on_disk = result.model.lm_head.weight.device.type == "meta"
    assert on_disk == (cpu == "50KB")
    assert [(t.target, t.shared) for t in result.report.keys.tied] == [("lm_head.weight", True)]
    audit = [f for f in result.report.findings if f.check == "tie_audit"]
    assert audit and audit[0].severity == "info" and "share storage" in audit[0].message
    inputs = builders.probe_inputs(plain)
    with torch.no_grad():
        assert torch.equal(result.model(**inputs).logits, plain(**inputs).logits)
    if on_disk:  # the same Parameter object, but a second copy on disk would break the tie
        index = dict(result.context.disk_offload_index)
        assert same_tensor(result.model, "lm_head.weight", "model.embed_tokens.weight", index) is True
        index["lm_head.weight"] = {**index["lm_head.weight"], "weight_name": "lm_head.weight"}
        assert same_tensor(result.model, "lm_head.weight", "model.embed_tokens.weight", index) is False
        del index["lm_head.weight"]
        assert same_tensor(result.model, "lm_head.weight", "model.embed_tokens.weight", index) is False


def test_dry_run_predicts_the_real_placement_and_bytes(checkpoints, tmp_path):
    options = dict(device_map="auto", max_memory={"cpu": "300KB", "disk": "10GB"})
    predicted = plan(checkpoints["llama_tied"], **options, offload_folder=str(tmp_path / "plan"))
    assert not (tmp_path / "plan").exists(), "a dry run writes nothing"
    assert set(predicted.placement.values()) == {"cpu", "disk"}

    real = qfinal.load(checkpoints["llama_tied"], **options, offload_folder=str(tmp_path / "off"))
    assert real.report.placement == predicted.placement
    measured = measured_bytes_per_device(real.model, real.context.disk_offload_index)
    assert measured == predicted.extra["plan"]["bytes_per_device"]
    assert real.report.ok and all(t.shared for t in real.report.keys.tied)


def test_dry_run_counts_quantized_bytes(checkpoints):
    report = plan(checkpoints["llama_untied"], quantize="nf4")
    real = qfinal.load(checkpoints["llama_untied"], quantize="nf4").model
    real_bytes = sum(t.numel() * t.element_size() for t in real.state_dict().values() if isinstance(t, torch.Tensor))
    predicted = report.extra["plan"]["total_bytes"]
    assert abs(predicted - real_bytes) / real_bytes < 0.02
    assert any(
        leaf["module"] in ("lm_head", "model.embed_tokens") for leaf in report.extra["plan"]["large_unquantized"]
    )


def _snapshot(model):
    """Tensors (offloaded ones, on meta here, by shape), and every flag a finishing stage may set.
    With offloaded tensors, also the logits on the probe batch: they read the offloaded weights
    through accelerate's hooks. (Not otherwise: bitsandbytes repacks 4-bit weights on the CPU's
    first forwards, which changes the state dict by itself.)"""
    state = {
        k: (v.detach().clone() if v.device.type != "meta" else tuple(v.shape))
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    if any(isinstance(v, tuple) for v in state.values()):
        with torch.no_grad():
            state["(logits)"] = model(**builders.probe_inputs(model)).logits
    flags = (
        [m.training for m in model.modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [getattr(m, "gradient_checkpointing", None) for m in model.modules()],
        sum(len(getattr(m, "_forward_hooks", {})) + len(getattr(m, "_forward_pre_hooks", {})) for m in model.modules()),
    )
    return state, type(model).__name__, sum(1 for _ in model.modules()), flags


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"quantize": "nf4"},
        {"quantize": "int8"},
        {"adapters": "lora"},
        {"adapters": "lora-merge"},
        {"source": "nf4", "dequantize": True},
        {"quantize": "nf4", "adapters": "lora-merge"},
        {"device_map": "auto", "max_memory": {"cpu": "300KB", "disk": "10GB"}},
        {"adapters": "lora", "runtime": {"mode": "training", "gradient_checkpointing": True}},
    ],
    ids=["plain", "nf4", "int8", "lora", "lora-merge", "dequantize", "nf4-lora-merge", "offload", "training"],
)
def test_finishing_stages_are_idempotent(checkpoints, tmp_path, options):
    options = dict(options)
    source = (
        checkpoints.quantized("llama_tied", options.pop("source")) if "source" in options else checkpoints["llama_tied"]
    )
    if "max_memory" in options:
        options["offload_folder"] = str(tmp_path / "offload")
    if "adapters" in options:
        from peft import LoraConfig, get_peft_model

        base = builders.model_class_for(checkpoints["llama_tied"]).from_pretrained(checkpoints["llama_tied"])
        get_peft_model(
            base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
        ).save_pretrained(tmp_path / "lora")
        options["adapters"] = [{"path": str(tmp_path / "lora"), "merge": options["adapters"] == "lora-merge"}]
    result = qfinal.load(source, **options)
    assert result.report.ok
    ctx = result.context
    before_state, before_type, before_modules, before_flags = _snapshot(ctx.model)
    before_ties = [t.model_dump() for t in result.report.keys.tied]
    for stage in (Postprocess(), TieWeights(), AdapterLoad(), Runtime()):
        stage.run(ctx)
    after_state, after_type, after_modules, after_flags = _snapshot(ctx.model)
    assert (after_type, after_modules) == (before_type, before_modules)
    assert after_flags == before_flags  # modes, trainable set, checkpointing, hooks (no second dispatch)
    assert after_state.keys() == before_state.keys()
    for k, v in before_state.items():
        assert torch.equal(after_state[k], v) if isinstance(v, torch.Tensor) else after_state[k] == v, k
    assert [t.model_dump() for t in ctx.report.keys.tied] == before_ties


@pytest.mark.parametrize("command", [["load", "--dry-run"], ["plan"]], ids=["load-dry-run", "plan"])
def test_load_dry_run_cli_reads_no_tensor_data(checkpoints, monkeypatch, capsys, tmp_path, command):
    """Every way to read tensor data is closed off: the loader, safetensors' tensor reads, qfinal's
    pread slices, torch.load. The plan (offloading, so the device map is inferred) still comes out."""
    import json

    import safetensors
    import safetensors.torch

    import qfinal.compat.transformers as hf
    from qfinal.checkpoint.reader import TensorSlice
    from qfinal.cli.app import main

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not read tensor data")

    real_open = safetensors.safe_open

    class HeadersOnly:
        def __init__(self, *args, **kwargs):
            self._fh = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

        def __getattr__(self, name):
            if name in ("get_tensor", "get_slice"):
                return refuse
            return getattr(self._fh, name)

    monkeypatch.setattr(hf, "load_checkpoint_into", refuse)
    import transformers.modeling_utils as modeling_utils

    monkeypatch.setattr(safetensors, "safe_open", HeadersOnly)
    monkeypatch.setattr(modeling_utils, "safe_open", HeadersOnly)  # imported by name there
    monkeypatch.setattr(modeling_utils, "_safe_load_bytes", refuse)
    monkeypatch.setattr(modeling_utils, "load_state_dict", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(TensorSlice, "__getitem__", refuse)
    source = str(checkpoints["llama_untied"])
    offload = ["--device-map", "auto", "--max-memory", "cpu=400KB,disk=10GB", "--offload-folder", str(tmp_path / "off")]
    for extra in (offload, ["--quantize", "nf4"]):
        with pytest.raises(SystemExit) as exit_info:
            main([command[0], source, *command[1:], "--json", "-", *extra])
        assert exit_info.value.code == 0
        data = json.loads(capsys.readouterr().out)
        assert data["command"] == "plan" and data["extra"]["plan"]["bytes_per_device"]["cpu"] > 0
        if extra is offload:
            assert set(data["placement"].values()) == {"cpu", "disk"}
            assert data["extra"]["plan"]["bytes_per_device"]["disk"] > 0
            assert not (tmp_path / "off").exists()
        else:
            assert len(data["keys"]["converted"]) == 14
            assert {leaf["module"] for leaf in data["extra"]["plan"]["large_unquantized"]} >= {"lm_head"}


@pytest.mark.parametrize("command", [["load"], ["load", "--dry-run"]], ids=["load", "dry-run"])
def test_quantized_model_that_would_offload_is_a_usage_error(checkpoints, capsys, tmp_path, command):
    """transformers' quantizer raises ValueError when a bnb model spills to disk: one line, exit 2."""
    from qfinal.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                command[0],
                str(checkpoints["llama_untied"]),
                *command[1:],
                "--quantize",
                "nf4",
                "--device-map",
                "auto",
                "--max-memory",
                "cpu=60KB,disk=10GB",
                "--offload-folder",
                str(tmp_path / "off"),
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "max_memory" in line and "offloaded to disk" in line
    assert not (tmp_path / "off").exists()
