"""qfinal dequantize: bnb nf4/fp4/int8 checkpoints -> plain checkpoints, bit for bit with transformers.

For every dequantized weight the reference is what transformers' own `model.dequantize(dtype)` puts
in that module (model = `Cls.from_pretrained(bnb_ckpt)`), moved to the checkpoint's layout (Conv1D:
[in, out]). Every other floating tensor must be the source tensor cast to `dtype`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402

import qfinal.compat.transformers_layout as layout  # noqa: E402
import qfinal.ops.dequantize as dq  # noqa: E402
import qfinal.ops.dequantize_verify as dqv  # noqa: E402
from qfinal.errors import CheckpointError, OutputError  # noqa: E402

ARCHS = ["llama_tied", "llama_untied", "gpt2"]
METHODS = ["nf4", "fp4", "nf4_dq", "fp4_dq", "int8"]
DTYPES = [torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}

tf.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------- helpers


def load_bnb(path: Path):
    """The bnb checkpoint as transformers loads it (still quantized). Fresh each call: a forward pass
    on CPU repacks 4-bit weights in place, after which transformers' dequantize() is wrong."""
    return builders.model_class_for(path).from_pretrained(path).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**builders.probe_inputs(model)).logits.float()


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cases(checkpoints, tmp_path_factory):
    """(arch, method, dtype) -> (bnb checkpoint, OUT, DequantizeResult); dequantized once per module."""
    root = tmp_path_factory.mktemp("dequantized")
    done = {}

    def get(arch, method, dtype):
        key = (arch, method, dtype)
        if key not in done:
            src = checkpoints.quantized(arch, method)
            out = root / f"{arch}-{method}-{dq.dtype_name(dtype)}"
            done[key] = (src, out, dq.dequantize_checkpoint(src, out, dtype=dtype))
        return done[key]

    return get


@pytest.fixture(scope="module")
def sharded_bnb(checkpoints, tmp_path_factory):
    """An untied llama nf4+double-quant checkpoint saved in 30 KB shards (quant-state parts of one
    weight may sit in different files)."""
    src = checkpoints["llama_untied"]
    model = builders.model_class_for(src).from_pretrained(
        src, quantization_config=tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS["nf4_dq"])
    )
    path = tmp_path_factory.mktemp("sharded") / "llama-nf4_dq-sharded"
    model.save_pretrained(path, max_shard_size="30KB")
    return path


@pytest.fixture(scope="module")
def bf16_bnb(checkpoints, tmp_path_factory):
    """gpt2 quantized from a bfloat16 model: the 4-bit quant state's dtype is bfloat16, so
    transformers dequantizes in bfloat16 and then casts (double rounding when asking float16)."""
    root = tmp_path_factory.mktemp("bf16")
    made = {}
    for method in ("nf4", "int8"):
        src = checkpoints["gpt2"]
        model = builders.model_class_for(src).from_pretrained(
            src, dtype=torch.bfloat16, quantization_config=tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS[method])
        )
        made[method] = builders._save(model, root / f"gpt2-bf16-{method}")
    return made


# ----------------------------------------------------------------------------------------- checks


def check_against_transformers(src: Path, out: Path, result, dtype: torch.dtype) -> None:
    """All of the fidelity contract for one (bnb checkpoint, OUT) pair."""
    # 1. OUT loads with plain from_pretrained, nothing missing/unexpected/mismatched.
    cls = builders.model_class_for(out)
    plain, info = cls.from_pretrained(out, output_loading_info=True)
    plain.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info.get("error_msgs")

    # 2. Dequantized weights == transformers' dequantize(dtype), in the checkpoint's layout.
    ref = load_bnb(src)
    ref.dequantize(dtype)  # before any forward pass (see load_bnb)
    got = builders.read_tensors(out)
    assert result.dequantized, "no weight was dequantized"
    for name in result.dequantized:
        owner = name.rsplit(".", 1)[0]
        want = ref.get_submodule(owner).weight.detach()
        assert isinstance(ref.get_submodule(owner), torch.nn.Linear)
        if isinstance(plain.get_submodule(owner), Conv1D):
            want = want.t()
        assert want.dtype == dtype, (name, want.dtype)
        assert builders.bits_equal(got[name], want.contiguous()), name

    # 3. Every other tensor == the source tensor cast to dtype (non-floating ones unchanged).
    source = builders.read_tensors(src)
    assert sorted(result.cast) == sorted(set(got) - set(result.dequantized))
    for name in result.cast:
        want = source[name]
        if want.is_floating_point():
            want = want.to(dtype)
        assert builders.bits_equal(got[name], want), name

    # 4. Every floating tensor in OUT (and in the loaded model) has the requested dtype.
    assert all(t.dtype == dtype for t in got.values() if t.is_floating_point())
    assert all(p.dtype == dtype for p in plain.state_dict().values() if p.is_floating_point())

    # 5. Same names as the source stored them, minus quant-state parts; ties kept as stored.
    assert set(got) <= set(source)
    assert ("lm_head.weight" in got) == ("lm_head.weight" in source)

    # 6. config.json: no quantization_config, dtype = requested, no torch_dtype; small files copied.
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "torch_dtype" not in config
    assert config["dtype"] == dq.dtype_name(dtype)
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}

    # 7. Logits. Tolerances are in units of u, the dtype's unit roundoff (2^-11 fp16, 2^-8 bf16):
    #    (a) OUT, run natively in `dtype`, vs transformers' exact dequantization run in float32:
    #        OUT differs only by rounding each tensor (and its activations) to `dtype`; measured
    #        <= 2.2u of max |logit| on these models, so 4u.
    #    (b) OUT vs the quantized model itself: bnb's CPU kernels add their own error (4-bit
    #        matmul in bfloat16 on AVX512-BF16 CPUs, int8 activation quantization: ~0.2-0.8% of
    #        max |logit|, not ours), so OUT must be as close to the bnb model as the exact float32
    #        dequantization is, plus the same 4u of dtype rounding.
    exact = load_bnb(src)
    exact.dequantize(torch.float32)
    exact = exact.float()
    want = logits(exact)
    quant = logits(load_bnb(src))
    have = logits(plain)
    scale = want.abs().max().item()
    tol = 4 * UNIT_ROUNDOFF[dtype] * scale
    assert (have - want).abs().max().item() <= tol
    assert (have - quant).abs().max().item() <= (want - quant).abs().max().item() + tol


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", DTYPES, ids=dq.dtype_name)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_dequantize_matches_transformers(cases, arch, method, dtype):
    src, out, result = cases(arch, method, dtype)
    assert result.quant_method == method.removesuffix("_dq")
    assert result.double_quant == method.endswith("_dq")
    assert result.dtype == dq.dtype_name(dtype)
    assert result.files == ["config.json", "generation_config.json", "model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    check_against_transformers(src, out, result, dtype)


def test_dequantize_float32_gpt2_nf4(checkpoints, tmp_path):
    src = checkpoints.quantized("gpt2", "nf4")
    out = tmp_path / "out"
    result = dq.dequantize_checkpoint(src, out, dtype="float32")
    check_against_transformers(src, out, result, torch.float32)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bfloat16_quant_state_cast_to_float16(bf16_bnb, tmp_path, method):
    """The quant state says bfloat16: dequantize in bfloat16, then cast, exactly like transformers."""
    src = bf16_bnb[method]
    out = tmp_path / "out"
    result = dq.dequantize_checkpoint(src, out, dtype=torch.float16)
    check_against_transformers(src, out, result, torch.float16)


def test_sharded_source_and_output(sharded_bnb, tmp_path):
    out = tmp_path / "out"
    calls = []
    result = dq.dequantize_checkpoint(
        sharded_bnb,
        out,
        dtype=torch.bfloat16,
        max_shard_size="40KB",
        progress=lambda done, total: calls.append((done, total)),
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert not (out / "model.safetensors").exists()
    assert result.files == sorted(shards + ["config.json", "generation_config.json", "model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as fh:
            for key in fh.keys():
                assert index["weight_map"][key] == shard
                tensors[key] = fh.get_tensor(key)
    assert set(index["weight_map"]) == set(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total == result.total_bytes
    # every shard under the limit unless it holds one tensor that is bigger on its own
    for shard in shards:
        keys = [k for k, f in index["weight_map"].items() if f == shard]
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        assert size <= 40_000 or len(keys) == 1
    assert calls[-1] == (len(tensors), len(tensors)) and len(calls) == len(tensors)
    assert [c[0] for c in calls] == list(range(1, len(tensors) + 1))
    # the streaming writer's shards are the bytes save_file writes for the same tensors
    from safetensors.torch import save_file

    for shard in shards:
        with safe_open(out / shard, "pt") as fh:
            again = {k: fh.get_tensor(k) for k in fh.keys()}
        save_file(again, tmp_path / "again.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "again.safetensors").read_bytes() == (out / shard).read_bytes(), shard
    check_against_transformers(sharded_bnb, out, result, torch.bfloat16)


def test_parts_of_one_weight_in_different_files(checkpoints, tmp_path):
    """One tensor per file, files named in reverse order: every 4-bit weight's packed data, absmax,
    quant_map, nested_* and quant-state blob are read from six different files."""
    from safetensors.torch import save_file

    bnb = checkpoints.quantized("gpt2", "nf4_dq")
    src = tmp_path / "scattered"
    src.mkdir()
    (src / "generation_config.json").write_bytes((bnb / "generation_config.json").read_bytes())
    config = json.loads((bnb / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # the pre-5.x spelling must go too
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    tensors = builders.read_tensors(bnb)
    weight_map = {}
    for i, key in enumerate(sorted(tensors, reverse=True)):
        weight_map[key] = f"part-{i:03d}.safetensors"
        save_file({key: tensors[key]}, src / weight_map[key], metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    out = tmp_path / "out"
    result = dq.dequantize_checkpoint(src, out, dtype=torch.float16)
    assert result.files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]  # the old index is not copied
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    check_against_transformers(src, out, result, torch.float16)


@pytest.mark.parametrize("extra", ["uint16", "F6_E2M3"])
def test_tensors_of_other_dtypes_are_copied_or_refused(checkpoints, tmp_path, extra):
    """A non-float tensor beside the quantized weights is copied as it is, in any dtype the
    safetensors writer knows (one table, qfinal.checkpoint.dtypes); a dtype torch has no name for is refused,
    naming the tensor."""
    import shutil
    import struct

    from safetensors.torch import save_file

    bnb = checkpoints.quantized("llama_untied", "nf4")
    src = tmp_path / "src"
    shutil.copytree(bnb, src)
    tensors = builders.read_tensors(bnb)
    tensors["extra.counts"] = torch.arange(-3, 3, dtype=torch.int16).view(torch.uint16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    if extra != "uint16":  # the same 12 bytes, named as 16 six-bit floats in a rewritten header
        raw = (src / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header["extra.counts"].update(dtype=extra, shape=[16])
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        (src / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        with pytest.raises(CheckpointError, match=f"extra.counts: unsupported tensor dtype {extra}"):
            dq.dequantize_checkpoint(src, tmp_path / "out", dtype=torch.float16)
        return
    result = dq.dequantize_checkpoint(src, tmp_path / "out", dtype=torch.float16)
    assert "model.safetensors" in result.files
    copied = builders.read_tensors(tmp_path / "out")["extra.counts"]
    assert copied.dtype == torch.uint16 and builders.bits_equal(copied, tensors["extra.counts"])


def test_bad_options(checkpoints, tmp_path):
    from qfinal.errors import ConfigError

    src = checkpoints.quantized("llama_tied", "nf4")
    with pytest.raises(ConfigError, match="dtype"):
        dq.dequantize_checkpoint(src, tmp_path / "a", dtype="int8")
    with pytest.raises(ConfigError, match="shard size"):
        dq.dequantize_checkpoint(src, tmp_path / "b", max_shard_size="lots")
    assert dq.parse_size("2GB") == 2 * 10**9 and dq.parse_dtype("torch.bfloat16") is torch.bfloat16
    assert list(tmp_path.iterdir()) == []


def test_verify_reports_ok(cases):
    for arch, method in [("gpt2", "nf4_dq"), ("llama_tied", "int8"), ("llama_untied", "fp4")]:
        src, out, _ = cases(arch, method, torch.float16)
        findings = dqv.verify_dequantized(src, out, torch.float16)
        assert {f.check for f in findings} == {
            "dequantize_keys",
            "dequantize_tensors",
            "dequantize_dtype",
            "dequantize_logits",
        }
        assert all(f.severity == "info" for f in findings), findings


def test_verify_reports_a_changed_tensor(cases, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src, out, result = cases("gpt2", "nf4", torch.float16)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "model.safetensors")
    victim = result.dequantized[0]
    tensors[victim] = tensors[victim].clone()
    tensors[victim][0, 0] += 1
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    errors = [f for f in dqv.verify_dequantized(src, bad, torch.float16) if f.severity == "error"]
    assert [(f.check, f.key) for f in errors if f.check == "dequantize_tensors"] == [("dequantize_tensors", victim)]


def test_not_bnb_checkpoint(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="not bitsandbytes-quantized") as err:
        dq.dequantize_checkpoint(checkpoints["llama_tied"], tmp_path / "out")
    assert err.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_other_quant_method(checkpoints, tmp_path):
    import shutil

    src = tmp_path / "gptq"
    shutil.copytree(checkpoints["gpt2"], src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gptq'"):
        dq.dequantize_checkpoint(src, tmp_path / "out")


def test_existing_out_needs_force(checkpoints, tmp_path):
    src = checkpoints.quantized("llama_tied", "nf4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError):
        dq.dequantize_checkpoint(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    dq.dequantize_checkpoint(src, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_failure_mid_write_leaves_nothing(sharded_bnb, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = dq.materialize
    seen = []

    def flaky(item, src, where, *rest):
        seen.append(item.name)
        if len(seen) == 12:
            # mid-write: output shards are already on disk in the temp folder beside OUT
            assert list(tmp_path.glob(".out.qfinal-tmp-*/model-*.safetensors"))
            raise RuntimeError("disk on fire")
        return real(item, src, where, *rest)

    monkeypatch.setattr(dq, "materialize", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dq.dequantize_checkpoint(sharded_bnb, out, max_shard_size="20KB")
    assert len(seen) == 12
    assert list(tmp_path.iterdir()) == []  # no OUT, no .out.qfinal-tmp-* folder


def test_conv1d_layout_comes_from_the_model_skeleton(checkpoints):
    conv1d, shapes, _prefix = layout.conv1d_layout(checkpoints.quantized("gpt2", "nf4"), "gpt2")
    assert "transformer.h.0.attn.c_attn" in conv1d and "lm_head" not in conv1d
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == [64, 256]  # [in, out]
    conv1d, _shapes, _prefix = layout.conv1d_layout(checkpoints.quantized("llama_tied", "int8"), "llama")
    assert conv1d == set()


# Architectures whose layout the fast path must decide without transformers (True: provably no
# Conv1D) or hand to the skeleton (False). Each is also checked against the skeleton below.
FAST_PATH = {
    "llama": True,
    "mistral": True,
    "qwen2": True,
    "gemma2": True,
    "phi3": True,
    "gpt_neox": True,
    "opt": True,
    "falcon": True,
    "bloom": True,
    "bert": True,
    "t5": True,
    "bart": True,
    "gpt2": False,
    "openai-gpt": False,
    "imagegpt": False,
}


def _first_class(model_type: str) -> str:
    from transformers.models.auto import modeling_auto as ma

    for mapping in (
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        ma.MODEL_MAPPING_NAMES,
    ):
        if model_type in mapping:
            return mapping[model_type]
    raise KeyError(model_type)


@pytest.mark.parametrize("model_type", sorted(FAST_PATH))
def test_conv1d_fast_path_agrees_with_the_skeleton(model_type, tmp_path):
    """The fast path reads transformers' sources instead of building the model; whenever it says
    "no Conv1D", the skeleton (a default-size model built on the meta device) has none."""
    arch = _first_class(model_type)
    config = tf.AutoConfig.for_model(model_type)
    config.architectures = [arch]
    config.save_pretrained(tmp_path)
    as_saved = json.loads((tmp_path / "config.json").read_text())
    fast = layout.plainly_without_conv1d(as_saved)
    assert fast == FAST_PATH[model_type], (model_type, arch)
    conv1d, shapes, _prefix = layout.conv1d_layout(tmp_path, model_type)  # no config: the skeleton
    # the skeleton's answer, which the fast path must never contradict (GPT-2 family: Conv1D)
    assert (conv1d == set()) == (model_type not in ("gpt2", "openai-gpt", "imagegpt")), (model_type, arch)
    if fast:
        assert conv1d == set(), (model_type, sorted(conv1d)[:3])
        assert layout.conv1d_layout(tmp_path, model_type, as_saved) == (set(), {}, "")
    else:
        assert layout.conv1d_layout(tmp_path, model_type, as_saved)[0] == conv1d  # the skeleton, as before


@pytest.mark.parametrize("change", ["auto_map", "two_archs", "sub_config", "unknown_class", "no_model_type"])
def test_conv1d_fast_path_refuses_what_it_cannot_prove(change):
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "quantization_config": {"quant_method": "bitsandbytes"},
    }
    assert layout.plainly_without_conv1d(config)  # the quantization_config is not a sub-model
    if change == "auto_map":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
    elif change == "two_archs":
        config["architectures"].append("LlamaModel")
    elif change == "sub_config":
        config["text_config"] = {"model_type": "gpt2"}
    elif change == "unknown_class":
        config["architectures"] = ["GPT2LMHeadModel"]  # not defined in modeling_llama.py
    else:
        del config["model_type"]
    assert not layout.plainly_without_conv1d(config)


def test_dequantize_without_conv1d_never_imports_transformers(checkpoints, tmp_path):
    """The point of the fast path: a Llama dequantize needs bitsandbytes, not transformers."""
    import subprocess

    src = checkpoints.quantized("llama_untied", "nf4")
    code = (
        "import sys, qfinal.ops.dequantize as dq; dq.dequantize_checkpoint(sys.argv[1], sys.argv[2]); "
        "print('transformers' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None, {}], ids=["pt", "none", "empty"])
def test_streaming_writer_matches_save_file(tmp_path, metadata):
    from safetensors.torch import save_file

    from qfinal.checkpoint.writer import write_safetensors_streaming

    tensors = builders.writer_tensors()
    want = tmp_path / "want.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, want, metadata=metadata)
    got = tmp_path / "got.safetensors"
    # tensors arrive in any order (here: reversed insertion order), not the file's layout order
    write_safetensors_streaming(
        got, builders.writer_entries(tensors), reversed(list(tensors.items())), metadata=metadata
    )
    assert got.read_bytes() == want.read_bytes()


def test_streaming_writer_header_padding_matches_save_file(tmp_path):
    """Header JSON lengths of every residue mod 8 (safetensors pads with spaces to a multiple of 8)."""
    from safetensors.torch import save_file

    from qfinal.checkpoint.writer import safetensors_layout, write_safetensors_streaming

    residues = set()
    for n in range(1, 17):
        tensors = {"w" * n: torch.ones(2, dtype=torch.float16), "b": torch.zeros(1)}
        save_file(tensors, tmp_path / "want", metadata={"format": "pt"})
        write_safetensors_streaming(
            tmp_path / "got", builders.writer_entries(tensors), tensors.items(), metadata={"format": "pt"}
        )
        assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes(), n
        header, _layout = safetensors_layout(builders.writer_entries(tensors), {"format": "pt"})
        residues.add(len(header.rstrip(b" ")) % 8)
    assert residues == set(range(8))
    # no tensors at all
    save_file({}, tmp_path / "want", metadata={"format": "pt"})
    write_safetensors_streaming(tmp_path / "got", [], [], metadata={"format": "pt"})
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()


def test_streaming_writer_holds_one_tensor_at_a_time(tmp_path):
    import weakref

    from qfinal.checkpoint.writer import write_safetensors_streaming

    shapes = {f"t{i}": [64, 64] for i in range(6)}
    alive = []

    def produce():
        for name in shapes:
            assert not [r for r in alive if r() is not None], "a written tensor is still referenced"
            tensor = torch.full(shapes[name], float(len(alive)))
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    path = tmp_path / "x.safetensors"
    write_safetensors_streaming(path, [(n, torch.float32, s) for n, s in shapes.items()], produce())
    got = builders.read_tensors(tmp_path)
    assert all(torch.equal(got[f"t{i}"], torch.full([64, 64], float(i))) for i in range(6))


def test_streaming_writer_refuses_what_the_header_does_not_say(tmp_path):
    from qfinal.checkpoint.writer import ShardWriter, write_safetensors_streaming

    entries = [("a", torch.float16, [2, 3]), ("b", torch.float32, [4])]
    with pytest.raises(ValueError, match="never written"):
        write_safetensors_streaming(tmp_path / "x", entries, [("a", torch.zeros(2, 3, dtype=torch.float16))])
    with pytest.raises(ValueError, match="header says"):
        write_safetensors_streaming(tmp_path / "x", entries, [("a", torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="header says"):
        write_safetensors_streaming(tmp_path / "x", entries, [("b", torch.zeros(5))])
    with pytest.raises(ValueError, match="not in the planned header"):
        write_safetensors_streaming(tmp_path / "x", entries, [("c", torch.zeros(4))])
    with pytest.raises(ValueError, match="written twice"):
        with ShardWriter(tmp_path / "x", entries) as w:
            w.write("b", torch.zeros(4))
            w.write("b", torch.zeros(4))
    with pytest.raises(ValueError, match="listed twice"):
        ShardWriter(tmp_path / "y", entries + [("a", torch.float16, [1])])
    with pytest.raises(ValueError, match="cannot be written"):
        ShardWriter(tmp_path / "y", [("q", torch.float4_e2m1fn_x2, [2])])
    assert not (tmp_path / "y").exists()


def test_source_reads_with_pread(checkpoints, monkeypatch):
    """Inputs are opened with the pread backend: nothing of the source stays mapped."""
    import safetensors

    from qfinal.checkpoint.sources import resolve_source
    from qfinal.ops.dequantize_plan import SourceReader

    resolved = resolve_source(checkpoints.quantized("gpt2", "nf4"))  # built before the spy
    backends = []
    real = safetensors.safe_open

    def spy(*args, **kwargs):
        backends.append(kwargs.get("backend", "mmap"))
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    src = SourceReader(resolved.folder, resolved.confine_to)
    try:
        for key in list(src.headers)[:3]:
            src.get(key)
    finally:
        src.close()
    assert backends and set(backends) == {"pread"}


# ----------------------------------------------------------------------------------------- the CLI


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_cli_dequantize_verify_and_existing_out(cases, tmp_path, capsys):
    src, ref_out, _result = cases("gpt2", "nf4", torch.float16)

    # --quiet: exit 0, nothing printed, OUT is what the library writes, loads with plain transformers
    out = tmp_path / "out"
    code, stdout, stderr = builders.run_cli(capsys, "dequantize", src, out, "--dtype", "float16", "--quiet")
    assert (code, stdout, stderr) == (0, "", "")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (ref_out / "model.safetensors").read_bytes()
    plain, info = builders.model_class_for(out).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(p.dtype == torch.float16 for p in plain.state_dict().values() if p.is_floating_point())
    assert not list(tmp_path.glob(".*qfinal-tmp-*"))

    # --verify --json -: exit 0, the four named checks, none with an error finding
    verified = tmp_path / "verified"
    code, stdout, stderr = builders.run_cli(
        capsys, "dequantize", src, verified, "--dtype", "float16", "--verify", "--json", "-"
    )
    assert "Traceback" not in stderr, stderr
    assert code == 0, stderr
    report = json.loads(stdout)
    checks = {"dequantize_keys", "dequantize_dtype", "dequantize_tensors", "dequantize_logits"}
    assert checks <= set(report["checks"]), report["checks"]
    assert report["ok"] is True and report["command"] == "dequantize"
    assert report["quantization"] == "nf4" and report["dtype"] == "float16"
    assert not [f for f in report["findings"] if f["severity"] == "error"], report["findings"]
    assert checks <= {f["check"] for f in report["findings"]}
    assert [s["name"] for s in report["stages"]] == ["dequantize", "verify"]
    assert (verified / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # an existing OUT without --force: exit 2, one line on stderr, OUT untouched
    before = _snapshot(out)
    code, stdout, stderr = builders.run_cli(capsys, "dequantize", src, out, "--dtype", "bfloat16")
    assert code == 2
    assert stdout == "" and len(stderr.splitlines()) == 1 and stderr.endswith("\n"), stderr
    assert "already exists" in stderr and str(out) in stderr and "--force" in stderr
    assert "Traceback" not in stderr
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "verified"]  # no temp folder left


def test_cli_not_bnb_source(checkpoints, tmp_path, capsys):
    src = checkpoints["llama_tied"]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "nested" / "out"  # not even OUT's parent may be left behind
    code, stdout, stderr = builders.run_cli(capsys, "dequantize", src, out)
    assert code == 2, stderr
    assert stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("qfinal: error: ") and "Traceback" not in stderr
    assert "not bitsandbytes-quantized" in stderr
    assert str(src) in stderr  # the folder (label) the config.json was read from
    assert list(work.iterdir()) == []  # no OUT, no parent, no .out.qfinal-tmp-* folder
    assert not list(src.parent.glob(".*qfinal-tmp-*"))


# ----------------------------------------------------------------------------------------- the pipeline option


@pytest.mark.parametrize(
    "arch,method,dtype",
    [
        ("llama_untied", "nf4", torch.float16),
        ("llama_untied", "fp4_dq", torch.bfloat16),
        ("llama_untied", "int8", torch.float16),
        ("gpt2", "nf4", torch.bfloat16),
        ("gpt2", "fp4_dq", torch.float16),
        ("gpt2", "int8", torch.bfloat16),
    ],
)
def test_pipeline_dequantize_equals_streamed(cases, arch, method, dtype):
    """`qfinal.load(bnb, dequantize=True, dtype=...)` is the same arithmetic as the streamed files."""
    import qfinal
    from qfinal.formats.bnb import QUANTIZED_CLASSES

    src, out, result = cases(arch, method, dtype)
    streamed = builders.read_tensors(out)
    loaded = qfinal.load(src, dequantize=True, dtype=dq.dtype_name(dtype))
    model = loaded.model
    assert loaded.report.ok, loaded.report.findings
    assert loaded.report.quantization == "none (dequantized)"
    assert loaded.report.dtype == dq.dtype_name(dtype)
    assert not [n for n, m in model.named_modules() if type(m).__name__ in QUANTIZED_CLASSES]
    sd = model.state_dict()

    # same names, except aliases of a tie the checkpoint stores once
    assert set(streamed) <= set(sd)
    for name in set(sd) - set(streamed):
        assert any(sd[name].data_ptr() == sd[other].data_ptr() for other in streamed), name
    differ = {}
    for name, want in streamed.items():
        have = sd[name]
        if not builders.bits_equal(have.detach(), want):
            differ[name] = (
                have.dtype,
                list(have.shape),
                want.dtype,
                list(want.shape),
                (have.float() - want.float()).abs().max().item() if have.shape == want.shape else None,
            )
    assert not differ, differ
    assert all(t.dtype == dtype for t in sd.values() if t.is_floating_point())

    # layout: the in-memory model has Conv1D modules again, storing [in, out] like the checkpoint
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    expected_conv1d, shapes, _prefix = layout.conv1d_layout(src, arch)
    assert conv1d == expected_conv1d
    assert bool(conv1d) == (arch == "gpt2")
    non_square = 0
    for name in result.dequantized:
        owner = name.rsplit(".", 1)[0]
        module = model.get_submodule(owner)
        if owner in conv1d:
            assert list(module.weight.shape) == [module.nx, module.nf] == shapes[name], name
            non_square += module.nx != module.nf
        else:
            assert isinstance(module, torch.nn.Linear), name
            assert list(module.weight.shape) == [module.out_features, module.in_features], name
    assert (non_square > 0) == (arch == "gpt2")  # square weights could not show a transposition


def test_cli_load_dequantize_report(checkpoints, capsys):
    src = checkpoints.quantized("gpt2", "nf4_dq")
    code, stdout, stderr = builders.run_cli(capsys, "load", src, "--dequantize", "--dtype", "float16", "--json", "-")
    assert "Traceback" not in stderr, stderr
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["quantization"] == "none (dequantized)"
    assert report["dtype"] == "float16" and report["ok"] is True
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["postprocess"]["status"] == "ran"
    assert "dequantized to float16" in stages["postprocess"]["detail"]
    assert "8 Conv1D layout(s) restored" in stages["postprocess"]["detail"]  # 2 layers x 4 Conv1D


# ------------------------------------------------------------- PositionalFile (O_DIRECT + buffered)


def _no_direct(monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_positional_file_any_order_any_alignment(tmp_path, monkeypatch, direct):
    """Disjoint ranges of every size class (inside one block, across a boundary, many blocks,
    more than one staging chunk) written in random order give exactly the intended bytes."""
    import random

    from qfinal.checkpoint.writer import PositionalFile

    if not direct:
        _no_direct(monkeypatch)
    monkeypatch.setattr(PositionalFile, "CHUNK", 3 * 4096)  # several chunks: staging buffers reused
    rng = random.Random(7)
    sizes = [1, 7, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5, 50_000, 123_457, 2, 8191]
    ranges, pos = [], 13  # an unaligned start
    for n in sizes * 3:
        ranges.append((pos, bytes(rng.getrandbits(8) for _ in range(n))))
        pos += n
    want = bytearray(pos)
    for off, data in ranges:
        want[off : off + len(data)] = data
    want[:13] = b"H" * 13
    rng.shuffle(ranges)
    f = PositionalFile(tmp_path / "x.bin")
    if direct and not f.direct:
        f.close()
        pytest.skip("no O_DIRECT on this filesystem")
    assert f.direct == direct
    f.write(0, b"H" * 13)
    for off, data in ranges:
        f.write(off, data)
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == bytes(want)


def test_positional_file_direct_write_error_is_raised(tmp_path, monkeypatch):
    """A failed direct write (the disk is full) fails the file: at the next write or at close."""
    import errno

    from qfinal.checkpoint.writer import PositionalFile

    f = PositionalFile(tmp_path / "x.bin")
    if not f.direct:
        f.close()
        pytest.skip("no O_DIRECT on this filesystem")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(f, "_direct_job", full)
    f.write(0, bytes(5 * 4096))
    with pytest.raises(OSError) as err:
        f.write(5 * 4096, bytes(PositionalFile.CHUNK * 3))  # waits for a staging buffer
        f.close()
    assert err.value.errno == errno.ENOSPC
    f.close(wait_errors=False)


def test_positional_file_falls_back_when_direct_io_is_refused(tmp_path, monkeypatch):
    """A filesystem that opens O_DIRECT but refuses the write (EINVAL): the block goes buffered."""
    import errno

    from qfinal.checkpoint.writer import PositionalFile

    f = PositionalFile(tmp_path / "x.bin")
    if not f.direct:
        f.close()
        pytest.skip("no O_DIRECT on this filesystem")
    real = os.pwrite

    refused = []

    def refuse_direct(fd, data, offset):
        if fd == f._direct:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    payload = bytes(range(256)) * 100  # 25,600 bytes: whole blocks plus a tail
    f.write(100, payload)
    f.write(0, b"x" * 100)
    f.close()
    assert refused == [4096]  # the whole blocks [4096, 24576) were tried direct, then went buffered
    assert (tmp_path / "x.bin").read_bytes() == b"x" * 100 + payload


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_streaming_writer_large_tensors_match_save_file(tmp_path, monkeypatch, direct):
    """Tensors of many blocks at unaligned offsets, through the direct path (and without it)."""
    from safetensors.torch import save_file

    from qfinal.checkpoint.writer import PositionalFile, write_safetensors_streaming

    if not direct:
        _no_direct(monkeypatch)
    jobs = []
    real_job = PositionalFile._direct_job
    monkeypatch.setattr(PositionalFile, "_direct_job", lambda self, *a: jobs.append(a[1:]) or real_job(self, *a))
    g = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(257 + i, 129, generator=g).to(torch.float16) for i in range(5)}
    tensors["tail"] = torch.randn(3, generator=g)
    save_file(tensors, tmp_path / "want", metadata={"format": "pt"})
    write_safetensors_streaming(
        tmp_path / "got", builders.writer_entries(tensors), reversed(list(tensors.items())), metadata={"format": "pt"}
    )
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()
    probe = PositionalFile(tmp_path / "probe")
    has_direct = probe.direct
    probe.close()
    assert bool(jobs) == (direct and has_direct)  # the direct path really wrote blocks (or none)
