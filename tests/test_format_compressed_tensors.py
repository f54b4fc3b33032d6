"""compressed-tensors checkpoints: header checks, `qfinal dequantize`, dequantize-on-load, and the
transformers defects that make qfinal dequantize them itself.

The checkpoints are made here by compressed-tensors itself (no llm-compressor): a tiny Llama with
`apply_quantization_config`, scales and zero points from each weight's min/max through the
library's `calculate_qparams`, then `ModelCompressor.compress_model` and `save_pretrained` /
`update_config`. The reference for every quantized weight is the library's own decompression of
that same compressed model (`ModelCompressor.decompress_model`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402

ct = pytest.importorskip("compressed_tensors")
tf.logging.set_verbosity_error()

# Two shapes: "even" divides by every group / block size used; "ragged" (hidden 76, intermediate
# 102) leaves partial int32 words in the packing and partial 32x32 blocks.
SHAPES = {
    "even": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "ragged": dict(hidden_size=76, intermediate_size=102, head_dim=20),
}
INT8_TOKEN = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
FP8_TOKEN = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
FP8_STATIC = dict(num_bits=8, type="float", symmetric=True, strategy="tensor")


def _w(bits, strategy, symmetric=True, kind="int", **extra):
    return dict(num_bits=bits, type=kind, symmetric=symmetric, strategy=strategy, **extra)


# name -> (shape, {targets: (weights, input_activations)})
SCHEMES = {
    "w4a16_g128_sym": ("even", {"Linear": (_w(4, "group", group_size=128), None)}),
    "w4a16_g32_asym": ("even", {"Linear": (_w(4, "group", False, group_size=32), None)}),
    "w4a16_channel_asym_ragged": ("ragged", {"Linear": (_w(4, "channel", False), None)}),
    "w8a16_channel_sym_ragged": ("ragged", {"Linear": (_w(8, "channel"), None)}),
    "w8a16_g32_asym": ("even", {"Linear": (_w(8, "group", False, group_size=32), None)}),
    "w8a8_int8_channel": ("even", {"Linear": (_w(8, "channel"), INT8_TOKEN)}),
    "fp8_tensor_static": ("even", {"Linear": (_w(8, "tensor", kind="float"), FP8_STATIC)}),
    "fp8_channel_ragged": ("ragged", {"Linear": (_w(8, "channel", kind="float"), FP8_TOKEN)}),
    "fp8_block128": ("even", {"Linear": (_w(8, "block", kind="float", block_structure=[128, 128]), FP8_TOKEN)}),
    "fp8_block32_ragged": ("ragged", {"Linear": (_w(8, "block", kind="float", block_structure=[32, 32]), FP8_TOKEN)}),
    "mixed_w4_attn_w8_mlp": (
        "even",
        {
            "re:.*self_attn.*": (_w(4, "group", group_size=32), None),
            "re:.*mlp.*": (_w(8, "channel"), None),
        },
    ),
}


def _min_max(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over each scale's elements, shaped as compressed-tensors shapes the scale."""
    if args.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if args.strategy == "channel":
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    if args.strategy == "group":
        grouped = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        return grouped.amin(-1), grouped.amax(-1)
    (bh, bw), (rows, cols) = args.block_structure, weight.shape
    padded = torch.zeros(math.ceil(rows / bh) * bh, math.ceil(cols / bw) * bw, dtype=weight.dtype)
    padded[:rows, :cols] = weight  # zeros change nothing: min/max are taken with 0 anyway
    blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    return blocks.amin((1, 3)), blocks.amax((1, 3))


def ct_checkpoint(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Write `name`'s checkpoint to `path` with compressed-tensors; return the library's own
    decompression of every quantized weight (module.weight -> tensor)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    shape, groups = SCHEMES[name]
    torch.manual_seed(builders.SEED)
    config = tf.LlamaConfig(tie_word_embeddings=False, **{**builders.LLAMA, **SHAPES[shape]})
    model = tf.LlamaForCausalLM(config).eval().to(torch.bfloat16)
    schemes = {
        f"group_{i}": QuantizationScheme(
            targets=[target],
            weights=QuantizationArgs(**weights),
            input_activations=QuantizationArgs(**inputs) if inputs else None,
        )
        for i, (target, (weights, inputs)) in enumerate(groups.items())
    }
    apply_quantization_config(model, QuantizationConfig(config_groups=schemes, ignore=["lm_head"]), show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            scale, zero_point = calculate_qparams(*_min_max(module.weight, scheme.weights), scheme.weights)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point)
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(0.0125)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    compressor.decompress_model(model)
    return {
        f"{n}.weight": m.weight.detach().clone()
        for n, m in model.named_modules()
        if getattr(m, "quantization_scheme", None) is not None
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint folder, the library's decompressed weights)."""
    root = tmp_path_factory.mktemp("ct")
    return {name: (root / name, ct_checkpoint(root / name, name)) for name in SCHEMES}


@pytest.fixture(scope="module")
def dequantized(built, tmp_path_factory):
    """name -> OUT of `qfinal dequantize SRC OUT --dtype bfloat16`, through the CLI."""
    sources = {name: src for name, (src, _) in built.items()}
    return builders.dequantize_each(sources, tmp_path_factory.mktemp("ct-out"), "bfloat16")


# ----------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_equals_compressed_tensors(built, dequantized, name):
    """Every quantized weight bit for bit the library's decompression; everything else the source
    cast; no quant state left; OUT loads with plain from_pretrained."""
    src, reference = built[name]
    out = dequantized[name]
    written = load_file(out / "model.safetensors")
    source = load_file(src / "model.safetensors")
    assert len(reference) == 14
    for key, expected in reference.items():
        assert written[key].dtype == torch.bfloat16
        assert builders.bits_equal(written[key], expected.to(torch.bfloat16)), key
    plain = {
        k
        for k in source
        if not any(
            k.endswith("." + s)
            for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "input_scale")
        )
    }
    assert set(written) == plain | set(reference)
    for key in plain - set(reference):
        assert builders.bits_equal(written[key], source[key].to(torch.bfloat16)), key
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, info = tf.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_dequantize_float32_is_the_library_result_exactly(built, tmp_path):
    """float32 OUT holds the library's bf16 result exactly (the cast adds nothing)."""
    from qfinal.ops.dequantize import dequantize_checkpoint

    src, reference = built["w4a16_g32_asym"]
    dequantize_checkpoint(src, tmp_path / "out", dtype="float32")
    written = load_file(tmp_path / "out" / "model.safetensors")
    for key, expected in reference.items():
        assert builders.bits_equal(written[key], expected.float()), key


def test_one_step_off_zero_point_is_caught(built, tmp_path):
    """Each stored code feeds the comparison: a zero point one step off changes the group it
    scales, and the bit-for-bit comparison with the library fails for that weight only."""
    from qfinal.ops.dequantize import dequantize_checkpoint

    src, reference = built["w4a16_g32_asym"]
    key = "model.layers.1.mlp.up_proj.weight_zero_point"

    def bump(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] += 1  # the first row's zero point, first group: +1 in the low nibble

    dequantize_checkpoint(builders.edited_copy(src, tmp_path / "src", bump), tmp_path / "out", dtype="bfloat16")
    written = load_file(tmp_path / "out" / "model.safetensors")
    wrong = [k for k, v in reference.items() if not builders.bits_equal(written[k], v.to(torch.bfloat16))]
    assert wrong == ["model.layers.1.mlp.up_proj.weight"]


def test_stored_codes_are_the_library_packing(built):
    """The unpacking alone, against the library's `unpack_from_int32`, for bit widths whose
    values straddle int32 words (3, 5, 7) as well as 2, 4 and 8, on a ragged width."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from qfinal.formats.compressed_tensors_math import unpack_int32

    g = torch.Generator().manual_seed(builders.SEED)
    for bits in range(1, 9):
        values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 77), generator=g, dtype=torch.int8)
        packed = pack_to_int32(values, bits)
        ours = unpack_int32(packed, bits, 77)
        assert torch.equal(ours, unpack_from_int32(packed, bits, torch.Size([5, 77]))), bits
        assert torch.equal(ours, values), bits
        packed_rows = pack_to_int32(values, bits, packed_dim=0)
        assert torch.equal(unpack_int32(packed_rows, bits, 5, packed_dim=0), values), bits


# ----------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name", list(SCHEMES))
def test_validate_fast_passes(capsys, built, name):
    code, report = builders.run_json(capsys, "validate", built[name][0], "--fast")
    assert code == 0, builders.failing_checks(report)
    quant = [f for f in report["findings"] if f["check"] == "quantization_config"]
    assert [f["severity"] for f in quant] == ["info"] and "14 quantized weight(s)" in quant[0]["message"]
    assert "dtype_consistency" not in builders.failing_checks(report, "warning")


def _drop(key):
    return lambda t: t.pop(key)


def _replace(key, make):
    return lambda t: t.update({key: make(t[key])})


Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"
BROKEN = {  # name -> (fixture, tensors edit, quantization_config edit)
    "missing_scale": ("w4a16_g32_asym", _drop(f"{Q}.weight_scale"), None),
    "missing_weight_shape": ("w4a16_g128_sym", _drop(f"{Q}.weight_shape"), None),
    "missing_zero_point": ("w4a16_g32_asym", _drop(f"{UP}.weight_zero_point"), None),
    "zero_point_on_symmetric": (
        "w4a16_g128_sym",
        lambda t: t.update({f"{Q}.weight_zero_point": torch.zeros(16, 1, dtype=torch.int32)}),
        None,
    ),
    "packed_width_for_8_bits": ("w4a16_g32_asym", _replace(f"{Q}.weight_packed", lambda v: v.repeat(1, 2)), None),
    "scale_groups_wrong": ("w4a16_g32_asym", _replace(f"{UP}.weight_scale", lambda v: v[:, :2].contiguous()), None),
    "int_scale": ("w8a16_channel_sym_ragged", _replace(f"{Q}.weight_scale", lambda v: v.to(torch.int32)), None),
    "zero_point_unpacked": ("w4a16_g32_asym", _replace(f"{UP}.weight_zero_point", lambda v: v.repeat(8, 1)), None),
    "fp8_weight_stored_bf16": ("fp8_channel_ragged", _replace(f"{Q}.weight", lambda v: v.to(torch.bfloat16)), None),
    "block_grid_floor_div": (
        "fp8_block32_ragged",
        _replace(f"{UP}.weight_scale", lambda v: v[:, :2].contiguous()),
        None,
    ),
    "missing_input_scale": ("fp8_tensor_static", _drop(f"{Q}.input_scale"), None),
    "stray_scale_on_norm": ("fp8_channel_ragged", lambda t: t.update({"model.norm.weight_scale": torch.ones(1)}), None),
    "ignored_module_quantized": ("w4a16_g128_sym", lambda t: None, lambda qc: qc.update(ignore=["lm_head", Q])),
    "config_says_8_bits": (
        "w4a16_g32_asym",
        lambda t: None,
        lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=8),
    ),
    "config_says_symmetric": (
        "w4a16_g32_asym",
        lambda t: None,
        lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=True),
    ),
    "config_group_size": (
        "w4a16_g32_asym",
        lambda t: None,
        lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=64),
    ),
    "named_target_stored_plain": (
        "mixed_w4_attn_w8_mlp",
        lambda t: (
            [t.pop(f"{UP}.{leaf}") for leaf in ("weight_packed", "weight_scale", "weight_shape")]
            and t.update({f"{UP}.weight": torch.zeros(256, 128, dtype=torch.bfloat16)})
        ),
        None,
    ),
}

# A dense weight where the config names a quantized one: validate flags the inconsistency, while
# dequantize has nothing to rebuild and writes it as stored.
DENSE_IS_DEQUANTIZABLE = {"named_target_stored_plain"}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_validate_fast_and_dequantize_refuse_broken_quant_state(capsys, built, tmp_path, broken):
    """Headers alone catch each defect (exit 1, the quantization_config check); `qfinal dequantize`
    refuses the same checkpoint with exit 2 and writes nothing."""
    fixture, edit, config_edit = BROKEN[broken]
    path = builders.edited_copy(built[fixture][0], tmp_path / broken, edit, config_edit)
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    assert "quantization_config" in builders.failing_checks(report)
    code, _out, err = builders.run_cli(capsys, "dequantize", path, tmp_path / "out")
    if broken in DENSE_IS_DEQUANTIZABLE:
        assert code == 0, err
        return
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith("qfinal: error:") and path.name in line, line
    assert not (tmp_path / "out").exists()


def test_weight_shape_contradicting_the_packing_is_refused(built, tmp_path):
    """weight_shape is data, not a header: `dequantize` reads it and checks it against the packing."""
    from qfinal.errors import CheckpointError
    from qfinal.ops.dequantize import dequantize_checkpoint

    path = builders.edited_copy(
        built["w4a16_channel_asym_ragged"][0],
        tmp_path / "bad",
        _replace(f"{Q}.weight_shape", lambda v: v + torch.tensor([0, 40])),
    )
    with pytest.raises(CheckpointError, match="int32 column"):
        dequantize_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- verify and load


@pytest.mark.parametrize("name", ["w4a16_g32_asym", "fp8_tensor_static", "mixed_w4_attn_w8_mlp"])
def test_dequantize_verify_against_the_library(capsys, built, tmp_path, name):
    """`--verify` compares OUT with compressed-tensors' own decompression: keys, every tensor bit
    for bit, logits (transformers has no dequantize() for this format)."""
    code, report = builders.run_json(
        capsys, "dequantize", built[name][0], tmp_path / "out", "--dtype", "bfloat16", "--verify"
    )
    assert code == 0, builders.failing_checks(report)
    messages = {f["check"]: f["message"] for f in report["findings"]}
    assert "21 tensors bit-identical" in messages["dequantize_tensors"]
    assert "max abs difference 0 " in messages["dequantize_logits"]


@pytest.mark.parametrize("name", ["w4a16_g32_asym", "w8a8_int8_channel", "fp8_block32_ragged", "mixed_w4_attn_w8_mlp"])
def test_load_holds_the_library_decompression(built, dequantized, name):
    """`qfinal load` dequantizes on load: every quantized weight is the library's decompression,
    everything else what `qfinal dequantize` writes; the report names the format."""
    from qfinal.ops.load import load

    src, reference = built[name]
    result = load(src, dtype="bfloat16")
    assert result.report.ok, [f.message for f in result.report.findings if f.severity == "error"]
    assert result.report.quantization.startswith("compressed-tensors ")
    assert "dequantized to bfloat16 on load" in result.report.quantization
    state = result.model.state_dict()
    for key, expected in reference.items():
        assert builders.bits_equal(state[key], expected.to(torch.bfloat16)), key
    written = load_file(dequantized[name] / "model.safetensors")
    assert set(written) == {k for k in state if "inv_freq" not in k}
    for key, tensor in written.items():
        assert builders.bits_equal(state[key], tensor), key
    assert {c.module for c in result.report.keys.converted} == {k.removesuffix(".weight") for k in reference}


# ----------------------------------------------------------------------------------------- transformers


def test_transformers_dequantize_true_is_silently_wrong_on_mixed_schemes(built, dequantized):
    """transformers' `dequantize=True` load decompresses every dense layer with the first config
    group's scheme: the W8 mlp weights come back wrong, with no warning. qfinal's are right."""
    src, reference = built["mixed_w4_attn_w8_mlp"]
    theirs = tf.LlamaForCausalLM.from_pretrained(
        src, quantization_config=tf.CompressedTensorsConfig(dequantize=True)
    ).state_dict()
    ours = load_file(dequantized["mixed_w4_attn_w8_mlp"] / "model.safetensors")
    wrong = sorted(k for k, v in reference.items() if not builders.bits_equal(theirs[k], v))
    assert wrong == sorted(k for k in reference if ".mlp." in k) and len(wrong) == 6
    assert all(builders.bits_equal(ours[k], v) for k, v in reference.items())


def test_transformers_default_load_cannot_take_asymmetric_packed_zero_points(built):
    """transformers' default (compressed) load of an asymmetric pack-quantized checkpoint fails on
    CPU; qfinal loads it (test_load_holds_the_library_decompression)."""
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        tf.LlamaForCausalLM.from_pretrained(built["w4a16_g32_asym"][0])


def test_importing_qfinal_does_not_import_compressed_tensors():
    code = (
        "import sys, qfinal, qfinal.formats, qfinal.ops.dequantize, qfinal.cli.app; "
        "sys.exit(1 if 'compressed_tensors' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode == 0


def _with_g_idx(tensors: dict) -> None:
    """An activation-order `weight_g_idx` for every module: a fixed shuffle of its column groups."""
    g = torch.Generator().manual_seed(builders.SEED)
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        groups = tensors[key].shape[1]
        order = torch.arange(groups, dtype=torch.int32).repeat_interleave(32)
        tensors[key.replace("weight_scale", "weight_g_idx")] = order[torch.randperm(order.numel(), generator=g)]


def test_activation_order_g_idx(capsys, built, tmp_path):
    """Checkpoints written with actorder "group" (compressed-tensors < 0.20) store `weight_g_idx`,
    the group of each input column. Reference: the library's own unpacking and group dequantize on
    the columns sorted by group, scattered back."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from qfinal.ops.dequantize import dequantize_checkpoint

    def actorder(qc):
        qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"

    path = builders.edited_copy(built["w4a16_g32_asym"][0], tmp_path / "src", _with_g_idx, actorder)
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 0, builders.failing_checks(report)
    dequantize_checkpoint(path, tmp_path / "out", dtype="bfloat16")
    written, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(path / "model.safetensors")
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    modules = [k.removesuffix(".weight_g_idx") for k in stored if k.endswith(".weight_g_idx")]
    assert len(modules) == 14
    for module in modules:
        shape = torch.Size(stored[f"{module}.weight_shape"].tolist())
        scale, g_idx = stored[f"{module}.weight_scale"], stored[f"{module}.weight_g_idx"]
        codes = unpack_from_int32(stored[f"{module}.weight_packed"], 4, shape)
        zero_point = unpack_from_int32(stored[f"{module}.weight_zero_point"], 4, scale.shape, packed_dim=0)
        order = torch.argsort(g_idx, stable=True)
        expected = torch.empty(shape, dtype=scale.dtype)
        expected[:, order] = dequantize(codes[:, order], scale, zero_point, args)
        assert builders.bits_equal(written[f"{module}.weight"], expected), module
    missing = builders.edited_copy(path, tmp_path / "missing", _drop(f"{Q}.weight_g_idx"))
    code, report = builders.run_json(capsys, "validate", missing, "--fast")
    assert code == 1 and "weight_g_idx" in str(builders.failing_checks(report))


def test_diff_reports_what_compressed_tensors_cost_per_layer_and_in_logits(built, tmp_path, capsys):
    """`qfinal diff CT DENSE_ORIGINAL`: the compressed side is dequantized on load, so every
    quantized weight shows the library's decompression error against the weight it was made
    from (float64), the logits their cost; the rest is identical."""
    name = "w4a16_g32_asym"
    src, reference = built[name]
    torch.manual_seed(builders.SEED)
    config = tf.LlamaConfig(tie_word_embeddings=False, **{**builders.LLAMA, **SHAPES[SCHEMES[name][0]]})
    tf.LlamaForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    code, report = builders.run_json(capsys, "diff", src, tmp_path / "dense")
    assert code == 1  # quantization changed values: not identical, and no tolerance was given
    diff = report["extra"]["diff"]
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    assert len(reference) == 14
    builders.assert_diff_rows(diff["tensors"], dense, reference)
    builders.assert_output_cost(diff["output"], builders.output_cost(tmp_path / "dense", torch.bfloat16, reference))
