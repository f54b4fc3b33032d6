"""qfinal.load must equal transformers' from_pretrained with the same options, bit for bit."""

from __future__ import annotations

import os

import builders
import pytest
import torch
import transformers as tf

import qfinal

FIXTURES = ["llama_tied", "llama_untied", "gpt2", "bert", "t5", "llama_sharded"]
QUANT = {
    "none": ({}, None),
    "nf4": ({"quantize": "nf4"}, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "fp4_dq": (
        {"quantize": "fp4", "double_quant": True},
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    ),
    "int8": ({"quantize": "int8"}, dict(load_in_8bit=True)),
}


def assert_state_dicts_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert builders.bits_equal(sa[key], sb[key]), key


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


@pytest.mark.parametrize("quant", ["nf4", "fp4_dq", "int8"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_quantize_on_load_from_mapped_tensors_equals_from_pretrained(checkpoints, monkeypatch, fixture, quant):
    """The fixtures' tensors are all under MAP_AT_LEAST (read with pread); here every one is mapped,
    as a real checkpoint's large weights are: still from_pretrained's model bit for bit."""
    from qfinal.checkpoint import reader

    mapped = []
    real = reader.TensorSlice._mapped
    monkeypatch.setattr(reader, "MAP_AT_LEAST", 0)
    monkeypatch.setattr(reader.TensorSlice, "_mapped", lambda self: mapped.append(self) or real(self))
    path = checkpoints[fixture]
    overrides, bnb = QUANT[quant]
    result = qfinal.load(path, **overrides)
    reference = builders.model_class_for(path).from_pretrained(path, quantization_config=tf.BitsAndBytesConfig(**bnb))
    assert len(mapped) > 10
    assert_state_dicts_identical(result.model, reference)
    assert_logits_identical(result.model, reference)
    assert result.report.ok, result.report.findings


# The other BitsAndBytesConfig options qfinal exposes, each against the same from_pretrained call.
OPTIONS = {
    "fp4": ({"quantize": "fp4"}, dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "nf4_compute_bf16": (
        {"quantize": "nf4", "compute_dtype": "bfloat16"},
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    ),
    "nf4_bf16_model": ({"quantize": "nf4", "dtype": "bfloat16"}, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "nf4_storage_bf16": (
        {"quantize": "nf4", "quant_storage": "bfloat16"},
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16),
    ),
    "nf4_skip": (
        {"quantize": "nf4", "skip_modules": ["lm_head", "SKIP"]},
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", "SKIP"]),
    ),
    "int8_threshold": ({"quantize": "int8", "int8_threshold": 3.0}, dict(load_in_8bit=True, llm_int8_threshold=3.0)),
}
SKIPPED_LAYER = {"llama_untied": "q_proj", "gpt2": "c_attn"}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("fixture", ["llama_untied", "gpt2"])
def test_quantization_options_equal_from_pretrained(checkpoints, fixture, option):
    path = checkpoints[fixture]
    overrides, bnb = OPTIONS[option]
    overrides, bnb = dict(overrides), dict(bnb)
    if "skip_modules" in overrides:
        overrides["skip_modules"] = bnb["llm_int8_skip_modules"] = ["lm_head", SKIPPED_LAYER[fixture]]
    result = qfinal.load(path, **overrides)
    kwargs = {"quantization_config": tf.BitsAndBytesConfig(**bnb)}
    if "dtype" in overrides:
        kwargs["dtype"] = getattr(torch, overrides["dtype"])
    reference = builders.model_class_for(path).from_pretrained(path, **kwargs)
    assert_state_dicts_identical(result.model, reference)
    assert_logits_identical(result.model, reference)
    assert result.report.ok, [f for f in result.report.findings if f.severity == "error"]
    if "skip_modules" in overrides:
        kept = {s.module.rsplit(".", 1)[-1] for s in result.report.keys.skipped}
        assert SKIPPED_LAYER[fixture] in kept
        assert not any(c.module.endswith(SKIPPED_LAYER[fixture]) for c in result.report.keys.converted)


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
    assert [s.name for s in report.stages] == [
        "meta_init",
        "quantizer_preprocess",
        "checkpoint_dispatch",
        "postprocess",
        "tie_weights",
        "adapter_load",
        "runtime",
        "validate",
    ]
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
    get_peft_model(base, LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights=False)).save_pretrained(
        tmp_path / "lora"
    )
    result = qfinal.load(
        checkpoints["llama_tied"],
        tie_weights=False,
        validate={"enabled": False},
        adapters=[str(tmp_path / "lora")],
        load_adapters=False,
    )
    statuses = {s.name: s.status for s in result.report.stages}
    assert statuses["tie_weights"] == "skipped by request"
    assert statuses["validate"] == "skipped by request"
    assert statuses["adapter_load"] == "skipped by request"
    assert result.report.adapters == [] and not hasattr(result.model, "peft_config")
    assert result.report.keys.tied and not any(t.shared for t in result.report.keys.tied)


@pytest.mark.parametrize("map_at_least", [0, None], ids=["mapped", "pread"])
def test_tensor_slices_are_the_files_bytes(tmp_path, monkeypatch, map_at_least):
    """Quantize-on-load reads through TensorSlice, mapped or with pread: every dtype, a scalar, an
    empty tensor, odd offsets and an index equal safetensors' own reads bit for bit; safetensors
    maps nothing; a file truncated after its header was read is a CheckpointError, not garbage
    (nor, mapped, a SIGBUS)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qfinal.checkpoint import reader
    from qfinal.checkpoint.reader import read_tensor_by_tensor
    from qfinal.errors import CheckpointError

    if map_at_least is not None:
        monkeypatch.setattr(reader, "MAP_AT_LEAST", map_at_least)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(33, 7, generator=g).bfloat16(),
        "f16": torch.randn(5, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "i64": torch.arange(-5, 5),
        "u8": torch.arange(200, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "big": torch.randn(1100, 257, generator=g),
    }  # > 1 MiB: mapped by default, across pages
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    mapped = []
    monkeypatch.setattr("safetensors.safe_open", lambda *a, **k: mapped.append(a) or safe_open(*a, **k))
    with read_tensor_by_tensor([str(path)]) as state:
        assert sorted(state) == sorted(tensors) and not mapped
        assert any(state[k].offset % 4096 for k in state if tensors[k].numel())  # not page-aligned
        for key, want in tensors.items():
            got = state[key][...]
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert builders.bits_equal(got, want), key
            assert state[key].get_shape() == list(want.shape)
        assert torch.equal(state["f32"][1], tensors["f32"][1])
    with read_tensor_by_tensor([str(path)]) as state:  # the file shrinks after its header was checked
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 16)
        last = max((k for k in state if tensors[k].numel()), key=lambda k: state[k].offset)
        with pytest.raises(CheckpointError, match="ended before"):
            state[last][...]


def _maps_of(path) -> int:
    return sum(str(path) in line for line in open("/proc/self/maps"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_a_mapped_tensor_takes_its_mapping_with_it(tmp_path):
    """Only large tensors are mapped, each on its own; freeing the tensor (after its views) unmaps
    its pages, so a quantized weight leaves nothing of the shard in RSS."""
    import gc

    from safetensors.torch import save_file

    from qfinal.checkpoint.reader import MAP_AT_LEAST, read_tensor_by_tensor

    path = tmp_path / "x.safetensors"
    big = torch.arange(MAP_AT_LEAST // 2 + 7, dtype=torch.int16)
    save_file({"big": big, "small": torch.ones(3)}, path)
    with read_tensor_by_tensor([str(path)]) as state:
        small = state["small"][...]
        assert _maps_of(path) == 0
        tensor = state["big"][...]
        view = tensor[5:]
        assert _maps_of(path) == 1 and torch.equal(tensor, big)
    del tensor
    gc.collect()
    assert _maps_of(path) == 1 and torch.equal(view, big[5:])  # a view keeps it, past the file's close
    del view
    gc.collect()
    assert _maps_of(path) == 0 and torch.equal(small, torch.ones(3))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("fixture", ["llama_untied", "gpt2"])
def test_heap_release_between_reads_changes_nothing(checkpoints, monkeypatch, fixture, quant):
    """Quantize-on-load gives freed heap pages back while it reads (HeapReleaser); forced before
    every read here, the model still equals from_pretrained bit for bit."""
    from qfinal.checkpoint import reader

    released, reads = [], []
    release, before_read = reader.HeapReleaser.release, reader.HeapReleaser.before_read
    monkeypatch.setattr(reader, "TRIM_EVERY_BYTES", 1)
    monkeypatch.setattr(reader.HeapReleaser, "release", lambda self: (released.append(self.pending), release(self)))
    monkeypatch.setattr(
        reader.HeapReleaser, "before_read", lambda self, nbytes: (reads.append(nbytes), before_read(self, nbytes))
    )
    path = checkpoints[fixture]
    overrides, bnb = QUANT[quant]
    result = qfinal.load(path, **overrides)
    reference = builders.model_class_for(path).from_pretrained(path, quantization_config=tf.BitsAndBytesConfig(**bnb))
    assert_state_dicts_identical(result.model, reference)
    assert_logits_identical(result.model, reference)
    assert len(reads) > 10 and all(reads)  # every checkpoint tensor went through TensorSlice
    if reader.HeapReleaser()._trim is not None:  # glibc
        assert len(released) == len(reads) - 1  # before every read but the first


def test_heap_release_counts_bytes_read():
    from qfinal.checkpoint.reader import HeapReleaser

    heap = HeapReleaser(every=100)
    calls = []
    heap._trim = calls.append
    for nbytes in (60, 30, 20, 100, 5):
        heap.before_read(nbytes)
    # 60+30 < 100: no release; 110 >= 100 before the 4th read; then 100 >= 100 before the 5th
    assert calls == [0, 0] and heap.pending == 5
    heap._trim = None
    heap.before_read(10**9)
    assert heap.pending == 5  # without malloc_trim nothing is counted or called
