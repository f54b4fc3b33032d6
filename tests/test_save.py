"""qfinal save: the saved folder reloads, through qfinal and plain transformers, to the same model."""

from __future__ import annotations

import json

import builders
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import qfinal
import qfinal.ops.save as saving


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


@pytest.mark.parametrize(
    "fixture,options",
    [
        ("llama_tied", {}),
        ("t5", {}),
        ("llama_tied", {"quantize": "nf4"}),
        ("gpt2", {"quantize": "nf4"}),
        ("llama_sharded", {"quantize": "fp4", "double_quant": True}),
        ("llama_untied", {"quantize": "int8"}),
        ("gpt2", {"quantize": "int8"}),
    ],
)
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


def assert_failed_unpublished(code, report, out, check):
    """Exit 1, `check` among the errors for both reloads, and OUT neither published nor left half-made."""
    errors = builders.failing_checks(report)
    assert code == 1
    assert report["ok"] is False
    assert check in errors, sorted(errors)
    for who in ("qfinal reload", "transformers reload"):
        assert any(f["message"].startswith(who) for f in errors[check]), (who, errors[check])
    assert any("not published" in f["message"] for f in errors["roundtrip_saved"])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.qfinal-tmp-*"))
    return errors


def _after_writing(monkeypatch, edit):
    """Let `write_model` write the folder, then call `edit(result, folder)` before the proof runs."""
    real_write = saving.write_model

    def write_then_edit(result, folder, max_bytes):
        writer = real_write(result, folder, max_bytes)
        edit(result, folder)
        return writer

    monkeypatch.setattr(saving, "write_model", write_then_edit)


def _edit_config(change):
    def edit(result, folder):
        path = folder / "config.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return edit


def test_tensor_changed_after_saving_fails_the_round_trip(checkpoints, tmp_path, monkeypatch, capsys):
    bump = 0.375  # exact in float32: the reported max abs difference must be exactly this
    original = {}

    def corrupt(result, folder):
        path = folder / "model.safetensors"
        tensors = load_file(path)
        original["w"] = tensors["model.norm.weight"].clone()
        tensors["model.norm.weight"][3] += bump
        save_file(tensors, path, metadata={"format": "pt"})

    _after_writing(monkeypatch, corrupt)
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out))
    errors = assert_failed_unpublished(code, report, out, "roundtrip_tensors")
    keyed = [f for f in errors["roundtrip_tensors"] if f["key"] == "model.norm.weight"]
    assert len(keyed) == 2  # one per reload, and no other tensor blamed
    assert {f["key"] for f in errors["roundtrip_tensors"]} == {None, "model.norm.weight"}
    rel = bump / original["w"].double().norm().item()
    for f in keyed:
        assert f"model.norm.weight: max abs diff {bump:g}, rel error {rel:.3g}" in f["message"], f["message"]


def test_tie_broken_before_saving_fails_the_round_trip(checkpoints, tmp_path, monkeypatch, capsys):
    real_write = saving.write_model

    def untie_then_write(result, folder, max_bytes):
        model = result.model
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        return real_write(result, folder, max_bytes)

    monkeypatch.setattr(saving, "write_model", untie_then_write)
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_tied"]), str(out))
    errors = assert_failed_unpublished(code, report, out, "roundtrip_ties")
    assert all("lm_head.weight" in f["message"] for f in errors["roundtrip_ties"])


@pytest.mark.parametrize(
    "options,change,field",
    [
        ([], lambda c: c.update(dtype="float16"), "dtype"),
        (
            ["--quantize", "nf4"],
            lambda c: c["quantization_config"].update(bnb_4bit_compute_dtype="float16"),
            "quantization_config",
        ),
    ],
    ids=["dtype", "quantization_config"],
)
def test_config_changed_after_saving_fails_the_round_trip(
    checkpoints, tmp_path, monkeypatch, capsys, options, change, field
):
    _after_writing(monkeypatch, _edit_config(change))
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out), *options)
    errors = assert_failed_unpublished(code, report, out, "roundtrip_config")
    assert {f["key"] for f in errors["roundtrip_config"]} == {field}
    assert all(f"config fields differ: {field}" in f["message"] for f in errors["roundtrip_config"])
    if field == "quantization_config":  # only the compute dtype changed: the stored tensors are all exact
        assert "roundtrip_tensors" not in errors and "roundtrip_keys" not in errors


def test_quantization_config_not_persisted_fails_keys_and_config(checkpoints, tmp_path, monkeypatch, capsys):
    """Without quantization_config the saved folder reloads as a float model: the packed weights do
    not fit (qfinal reports it; plain from_pretrained refuses to load) and the quant state keys are gone."""
    _after_writing(monkeypatch, _edit_config(lambda c: c.pop("quantization_config")))
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out), "--quantize", "nf4")
    errors = builders.failing_checks(report)
    assert code == 1 and not out.exists() and not list(tmp_path.glob(".out.qfinal-tmp-*"))
    assert {f["key"] for f in errors["roundtrip_config"]} == {"quantization_config"}
    missing = {f["key"] for f in errors["roundtrip_keys"]} - {None}
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in missing
    assert all(f["message"].startswith("qfinal reload") for f in errors["roundtrip_keys"])
    assert any(
        f["message"].startswith("transformers reload: from_pretrained failed") for f in errors["roundtrip_saved"]
    )


def test_tensor_dropped_from_saved_files_fails_the_round_trip(checkpoints, tmp_path, monkeypatch, capsys):
    """A tensor missing from the files does not change the reloaded key set (transformers initializes
    the parameter at random), so it is `missing_keys` and `roundtrip_tensors` that fail, not `roundtrip_keys`."""
    dropped = "model.layers.0.mlp.up_proj.weight"

    def drop(result, folder):
        path = folder / "model.safetensors"
        tensors = load_file(path)
        del tensors[dropped]
        save_file(tensors, path, metadata={"format": "pt"})

    _after_writing(monkeypatch, drop)
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out))
    errors = assert_failed_unpublished(code, report, out, "roundtrip_tensors")
    assert [f["key"] for f in errors["missing_keys"]] == [dropped]
    assert {f["key"] for f in errors["roundtrip_tensors"]} == {None, dropped}
    assert "roundtrip_keys" not in errors


def test_logits_changed_with_every_tensor_exact_fails_the_round_trip(checkpoints, tmp_path, monkeypatch, capsys):
    """roundtrip_logits fails on its own when forward-relevant state is outside the state dict: the
    rotary `inv_freq` is a non-persistent buffer, so changing it in the finalized model (before the
    probe forward, which runs while the files are written) leaves keys, tensors, ties and config
    equal while the logits differ."""
    real_load = saving.load

    def load_then_edit(source, config=None, **kwargs):
        result = real_load(source, config, **kwargs)
        if kwargs.get("command") == "save":
            result.model.model.rotary_emb.inv_freq.mul_(2)
        return result

    monkeypatch.setattr(saving, "load", load_then_edit)
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out))
    errors = assert_failed_unpublished(code, report, out, "roundtrip_logits")
    assert set(errors) == {"roundtrip_logits", "roundtrip_saved"}
    passed = {f["check"] for f in report["findings"] if f["severity"] == "info"}
    assert {"roundtrip_keys", "roundtrip_tensors", "roundtrip_ties", "roundtrip_config"} <= passed


def assert_sharded_as_indexed(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = builders.tensors_by_file(folder)
    assert "model.safetensors" not in files
    assert len(files) >= 2 and set(files) == set(weight_map.values())
    for name, tensors in files.items():
        assert set(tensors) == {k for k, f in weight_map.items() if f == name}, name
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for tensors in files.values() for t in tensors.values()
    )


def assert_single_file(folder):
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("kind", ["plain", "prequantized"])
def test_max_shard_size_shards_the_saved_folder(checkpoints, tmp_path, capsys, kind):
    source = checkpoints["llama_untied"] if kind == "plain" else checkpoints.quantized("llama_tied", "nf4")
    sharded = tmp_path / "sharded"
    code, report = builders.run_json(capsys, "save", str(source), str(sharded), "--max-shard-size", "40KB")
    assert code == 0, builders.failing_checks(report)
    writer = report["extra"]["save"]["writer"]
    if kind == "plain":
        assert writer == "save_pretrained"
    else:
        assert writer.startswith("qfinal writer")
    assert_sharded_as_indexed(sharded)

    single = tmp_path / "single"  # the default max shard size (2GB)
    assert_round_trip_proven(qfinal.save(source, single), single)
    assert_single_file(single)
    a, b = builders.read_tensors(sharded), builders.read_tensors(single)
    assert a.keys() == b.keys() and all(builders.bits_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,out_shard", [("nf4", "40KB"), ("fp4", "2GB")])
def test_save_sharded_prequantized_checkpoint(checkpoints, tmp_path, method, out_shard):
    source = builders.bnb_checkpoint(checkpoints["llama_sharded"], tmp_path / "src", method, max_shard_size="40KB")
    assert_sharded_as_indexed(source)
    quant = json.loads((source / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_quant_type"] == method and not quant["bnb_4bit_use_double_quant"]

    out = tmp_path / "out"
    report = qfinal.save(source, out, max_shard_size=out_shard)
    assert_round_trip_proven(report, out)
    assert report.extra["save"]["writer"].startswith("qfinal writer")
    if out_shard == "2GB":
        assert_single_file(out)
    else:
        assert_sharded_as_indexed(out)
    original, saved = builders.read_tensors(source), builders.read_tensors(out)
    assert original.keys() == saved.keys()
    assert sum(k.endswith(f".weight.quant_state.bitsandbytes__{method}") for k in saved) == 14
    assert [k for k in original if not builders.bits_equal(original[k], saved[k])] == []


def test_existing_output_needs_force(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _out, err = builders.run_cli(capsys, "save", str(checkpoints["llama_untied"]), str(out))
    assert code == 2
    assert "already exists" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").exists()

    code, _out, _err = builders.run_cli(
        capsys, "save", str(checkpoints["llama_untied"]), str(out), "--force", "--quiet"
    )
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert torch.equal(
        tf.LlamaForCausalLM.from_pretrained(out).lm_head.weight,
        tf.LlamaForCausalLM.from_pretrained(checkpoints["llama_untied"]).lm_head.weight,
    )


@pytest.fixture(scope="module")
def lora(tmp_path_factory, checkpoints):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = builders.model_class_for(checkpoints["llama_tied"]).from_pretrained(checkpoints["llama_tied"])
    path = tmp_path_factory.mktemp("adapters") / "my-lora"
    get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)).save_pretrained(
        path
    )
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


# ------------------------------------------------ the qfinal reload's tensors proven by location


def _count_tensor_reads(monkeypatch):
    """Names compared by reading both tensors (compare.diff_tensor), per call of compare_models."""
    import qfinal.compare.models as compare

    reads: list[str] = []
    real = compare.diff_tensor
    monkeypatch.setattr(compare, "diff_tensor", lambda name, *a, **k: reads.append(name) or real(name, *a, **k))
    return reads


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/pagemap")
def test_qfinal_reload_tensors_mapping_the_proven_bytes_are_not_read_again(checkpoints, tmp_path, monkeypatch):
    reads = _count_tensor_reads(monkeypatch)
    report = qfinal.save(checkpoints["llama_untied"], tmp_path / "out")
    assert_round_trip_proven(report, tmp_path / "out")
    saved = set(load_file(tmp_path / "out" / "model.safetensors"))
    # every saved tensor read once (the transformers reload); the qfinal reload reads only what
    # does not map the saved bytes (non-persistent-free Llama: nothing)
    assert sorted(reads) == sorted(saved)
    qfinal_msgs = [
        f.message for f in report.findings if f.check == "roundtrip_tensors" and f.message.startswith("qfinal reload")
    ]
    assert qfinal_msgs == [f"qfinal reload: {len(saved)} tensors within exact equality ({len(saved)} bit-identical)"]


def test_qfinal_reload_tensor_changed_in_memory_is_still_caught(checkpoints, tmp_path, monkeypatch, capsys):
    """A qfinal-reload tensor with a private (written) page is not the file's bytes any more: it is
    read and compared, and the difference is reported for the qfinal reload only."""
    real_load = saving.load

    def load_then_edit(*args, **kwargs):
        result = real_load(*args, **kwargs)
        if kwargs.get("command") == "save (reload)":
            result.model.model.norm.weight.data[1] += 0.5
        return result

    monkeypatch.setattr(saving, "load", load_then_edit)
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out))
    assert code == 1 and not out.exists()
    errors = builders.failing_checks(report)
    keyed = [f for f in errors["roundtrip_tensors"] if f["key"] == "model.norm.weight"]
    assert [f["message"].split(":")[0] for f in keyed] == ["qfinal reload"]
    assert "max abs diff 0.5" in keyed[0]["message"]


def test_saved_file_replaced_between_reloads_is_still_caught(checkpoints, tmp_path, monkeypatch, capsys):
    """The qfinal reload maps a rewritten file (another inode): no location matches the proven
    ones, so every tensor is read and the change is found."""
    real_load = saving.load

    def rewrite_then_load(*args, **kwargs):
        if kwargs.get("command") == "save (reload)":
            path = args[0] / "model.safetensors"
            tensors = load_file(path)
            tensors["model.norm.weight"][2] += 0.25
            save_file(tensors, str(path) + ".new", metadata={"format": "pt"})
            __import__("os").replace(str(path) + ".new", path)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(saving, "load", rewrite_then_load)
    reads = _count_tensor_reads(monkeypatch)
    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "save", str(checkpoints["llama_untied"]), str(out))
    assert code == 1 and not out.exists()
    keyed = [f for f in builders.failing_checks(report)["roundtrip_tensors"] if f["key"] == "model.norm.weight"]
    assert [f["message"].split(":")[0] for f in keyed] == ["qfinal reload"]
    assert "max abs diff 0.25" in keyed[0]["message"]
    saved = {n for n in reads}  # every saved tensor, each read by both reloads: none proven by location
    assert sorted(reads) == sorted(list(saved) * 2) and "model.norm.weight" in saved


# ----------------------------------------------------------------------------- the probe beside the write


@pytest.mark.parametrize("overrides, overlaps", [({}, True), ({"quantize": "nf4"}, False)])
def test_the_probe_runs_beside_the_write_for_a_plain_model_only(checkpoints, overrides, overlaps):
    result = qfinal.load(checkpoints["llama_untied"], **overrides)
    assert saving.overlaps_write(result) is overlaps


def test_the_round_trip_probe_is_one_short_sequence(checkpoints):
    """The logits check runs three forwards; it uses `ROUND_TRIP_PROBE` (1 x 4 tokens), not diff's
    2 x 16, and the reference logits are those of that probe."""
    from qfinal.compare.outputs import probe_batch, probe_logits

    model = qfinal.load(checkpoints["llama_untied"]).model
    reference = saving.original_logits(model)
    assert reference["probe"]["input_ids"].shape == (1, 4) == tuple(reference["logits"].shape[:2])
    expected = probe_logits(model, probe_batch(model, batch=1, length=4))
    assert torch.equal(reference["logits"], expected)


def test_a_probe_that_fails_beside_the_write_publishes_nothing(checkpoints, tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("probe forward failed")

    monkeypatch.setattr(saving, "original_logits", broken)
    parent = tmp_path / "publish"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="probe forward failed"):
        saving.save(checkpoints["llama_untied"], parent / "out")
    assert list(parent.iterdir()) == []  # neither OUT nor the temporary folder beside it
