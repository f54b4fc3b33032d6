"""FP8 fine-grained block-scaled checkpoints (quant_method "fp8"): header checks and `qfinal dequantize`.

The checkpoints are built here: a tiny Llama's projection weights quantized to float8_e4m3fn with
per-block absmax/448 scales on the ceil-div grid (partial last blocks when a dimension does not
divide by the block). The reference dequantization is written here independently of qfinal; for
divisible shapes it is also transformers' own (its CPU load dequantizes FP8), for the ragged one
transformers' result is shown to be wrong.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402

tf.logging.set_verbosity_error()

BLOCK = (32, 32)
SHAPES = {"divisible": 64, "ragged": 72}  # hidden size; 72 = 2 full blocks + a partial one


def quantize_block(weight: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 weight_scale_inv on the ceil-div grid): absmax/448 per block."""
    (rows, cols), (bh, bw) = weight.shape, block
    grid = (math.ceil(rows / bh), math.ceil(cols / bw))
    padded = torch.zeros(grid[0] * bh, grid[1] * bw)
    padded[:rows, :cols] = weight.float()
    scale = (padded.reshape(grid[0], bh, grid[1], bw).abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    full = scale.repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols]
    return (weight.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def reference(weight: torch.Tensor, scale: torch.Tensor, block, dtype) -> torch.Tensor:
    """Each element times its own block's scale, then one cast (written without repeat_interleave)."""
    rows = torch.arange(weight.shape[0]) // block[0]
    cols = torch.arange(weight.shape[1]) // block[1]
    return (weight.float() * scale[rows[:, None], cols[None, :]]).to(dtype)


def fp8_checkpoint(path: Path, hidden: int) -> Path:
    torch.manual_seed(builders.SEED)
    config = tf.LlamaConfig(tie_word_embeddings=False, **{**builders.LLAMA, "hidden_size": hidden})
    tf.LlamaForCausalLM(config).eval().save_pretrained(path)
    tensors = {}
    for key, value in load_file(path / "model.safetensors").items():
        if key.endswith("_proj.weight"):
            tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = quantize_block(value, BLOCK)
        else:
            tensors[key] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["lm_head"],
    }
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {name: fp8_checkpoint(root / name, hidden) for name, hidden in SHAPES.items()}


@pytest.fixture(scope="module")
def dequantized(fp8, tmp_path_factory):
    """name -> OUT of `qfinal dequantize SRC OUT --dtype bfloat16`, run through the CLI."""
    return builders.dequantize_each(fp8, tmp_path_factory.mktemp("fp8-out"), "bfloat16")


def scaled_pairs(src: Path):
    """(weight key, fp8 weight, scale) for every quantized weight of `src`."""
    tensors = load_file(src / "model.safetensors")
    for key in sorted(tensors):
        if key.endswith(".weight_scale_inv"):
            weight = key.removesuffix("_scale_inv")
            yield weight, tensors[weight], tensors[key]


# ----------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name", list(SHAPES))
def test_validate_fast_passes(capsys, fp8, name):
    code, report = builders.run_json(capsys, "validate", fp8[name], "--fast")
    assert code == 0, builders.failing_checks(report)
    quant = [f for f in report["findings"] if f["check"] == "quantization_config"]
    assert [f["severity"] for f in quant] == ["info"] and "fp8" in quant[0]["message"]
    assert "dtype_consistency" not in builders.failing_checks(report, "warning")


BROKEN = {
    "missing_scale": lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"),
    "floor_div_grid": lambda t: t.update(
        {
            "model.layers.0.mlp.up_proj.weight_scale_inv": t["model.layers.0.mlp.up_proj.weight_scale_inv"][
                :, :2
            ].contiguous()
        }
    ),
    "bf16_scale": lambda t: t.update(
        {"model.layers.1.mlp.down_proj.weight_scale_inv": t["model.layers.1.mlp.down_proj.weight_scale_inv"].bfloat16()}
    ),
    "stray_scale": lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1, 1)}),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_validate_fast_fails_on_bad_scales(capsys, fp8, tmp_path, broken):
    path = builders.edited_copy(fp8["ragged"], tmp_path / broken, BROKEN[broken])
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    assert "quantization_config" in builders.failing_checks(report)


def test_validate_fast_fails_on_bad_block_size(capsys, fp8, tmp_path):
    """config.json says [16, 16] blocks; the stored scale grid is for [32, 32]."""
    path = builders.edited_copy(
        fp8["divisible"], tmp_path / "bad_block", config_edit=lambda qc: qc.update(weight_block_size=[16, 16])
    )
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    assert "quantization_config" in builders.failing_checks(report)


# ----------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("name", list(SHAPES))
def test_dequantized_loads_plain_and_equals_reference(fp8, dequantized, name):
    out = dequantized[name]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = tf.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert getattr(model, "hf_quantizer", None) is None
    state = model.state_dict()
    written = load_file(out / "model.safetensors")
    pairs = list(scaled_pairs(fp8[name]))
    assert len(pairs) == 14
    for key, weight, scale in pairs:
        expected = reference(weight, scale, BLOCK, torch.bfloat16)
        assert written[key].dtype == torch.bfloat16
        assert builders.bits_equal(written[key], expected), key
        assert builders.bits_equal(state[key], expected), key


def test_divisible_equals_transformers(fp8, dequantized):
    """transformers on CPU dequantizes FP8 while loading: for divisible shapes it is the same bits."""
    theirs = tf.LlamaForCausalLM.from_pretrained(fp8["divisible"], dtype=torch.bfloat16).state_dict()
    ours = load_file(dequantized["divisible"] / "model.safetensors")
    assert set(ours) == {k for k in theirs if "inv_freq" not in k}
    scaled = {key for key, _, _ in scaled_pairs(fp8["divisible"])}
    for key, value in ours.items():
        # Unquantized modules (lm_head) may stay in transformers' load dtype: compare them cast.
        assert builders.bits_equal(value, theirs[key] if key in scaled else theirs[key].to(value.dtype)), key


def test_ragged_transformers_is_wrong_qfinal_right(fp8, dequantized):
    """hidden 72 with block 32: a 3-block grid, which transformers reads as blocks of 24."""
    theirs = tf.LlamaForCausalLM.from_pretrained(fp8["ragged"], dtype=torch.bfloat16).state_dict()
    ours = load_file(dequantized["ragged"] / "model.safetensors")
    wrong = []
    for key, weight, scale in scaled_pairs(fp8["ragged"]):
        expected = reference(weight, scale, BLOCK, torch.bfloat16)
        assert builders.bits_equal(ours[key], expected), key
        if not builders.bits_equal(theirs[key], expected):
            wrong.append(key)
    assert len(wrong) == 14


def test_dequantize_refuses_misshapen_scale(fp8, tmp_path):
    from qfinal.errors import CheckpointError
    from qfinal.ops.dequantize import dequantize_checkpoint

    path = builders.edited_copy(fp8["ragged"], tmp_path / "bad", BROKEN["floor_div_grid"])
    with pytest.raises(CheckpointError, match="weight_scale_inv has shape"):
        dequantize_checkpoint(path, tmp_path / "out", dtype="bfloat16")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("name", list(SHAPES))
def test_load_dequantizes_on_load_exactly_as_dequantize_writes(fp8, dequantized, name, capsys):
    """transformers' fp8 loader refuses a machine without a GPU (and mis-scales the ragged blocks
    once that check is bypassed); qfinal's load rebuilds each weight with the format's arithmetic
    as the loader reads it: the model holds exactly what `qfinal dequantize` writes."""
    from qfinal.ops.load import load

    result = load(fp8[name], dtype="bfloat16")
    assert result.report.ok, [f.message for f in result.report.findings if f.severity == "error"]
    assert result.report.quantization.startswith("fp8 dequantized to bfloat16 on load")
    state = result.model.state_dict()
    written = load_file(dequantized[name] / "model.safetensors")
    assert set(written) == {k for k in state if "inv_freq" not in k}
    for key, tensor in written.items():
        assert builders.bits_equal(state[key], tensor), key
    converted = {c.module for c in result.report.keys.converted}
    assert converted == {key.removesuffix(".weight") for key, _, _ in scaled_pairs(fp8[name])}
    assert all(type(m).__name__ != "FP8Linear" for m in result.model.modules())
    code, _out, err = builders.run_cli(capsys, "validate", fp8[name])
    assert code == 0, err


def test_load_requantize_equals_transformers_on_the_dequantized_checkpoint(fp8, dequantized):
    """`--quantize nf4` on an fp8 source quantizes the dequantized weights: the packed bytes are
    transformers' own nf4 load of the `qfinal dequantize` output, and the report warns that the
    two rounding errors compound."""
    from qfinal.ops.load import load

    result = load(fp8["ragged"], dtype="bfloat16", quantize="nf4")
    assert result.report.quantization.endswith("then nf4")
    warnings = [f.message for f in result.report.findings if f.severity == "warning"]
    assert any("compound" in message for message in warnings), warnings
    theirs = tf.LlamaForCausalLM.from_pretrained(
        dequantized["ragged"],
        dtype=torch.bfloat16,
        quantization_config=tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    ).state_dict()
    ours = result.model.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert builders.bits_equal(ours[key], tensor), key


def test_load_refuses_misshapen_scale(fp8, tmp_path, capsys):
    path = builders.edited_copy(fp8["ragged"], tmp_path / "bad", BROKEN["floor_div_grid"])
    code, _out, err = builders.run_cli(capsys, "load", path)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert "fp8 checkpoint cannot be loaded" in line and "weight_scale_inv has shape" in line


def test_diff_reports_what_fp8_cost_per_layer_and_in_logits(fp8, tmp_path, capsys):
    """`qfinal diff FP8 DENSE_ORIGINAL`: the fp8 side is dequantized on load, so every quantized
    weight shows its rounding error and the logits their cost; the rest is identical."""
    torch.manual_seed(builders.SEED)
    config = tf.LlamaConfig(tie_word_embeddings=False, **{**builders.LLAMA, "hidden_size": SHAPES["ragged"]})
    tf.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "dense")
    code, report = builders.run_json(capsys, "diff", fp8["ragged"], tmp_path / "dense")
    assert code == 1  # quantization changed values: not identical, and no tolerance was given
    diff = report["extra"]["diff"]
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    scaled = {key: reference(weight, scale, BLOCK, torch.float32) for key, weight, scale in scaled_pairs(fp8["ragged"])}
    builders.assert_diff_rows(diff["tensors"], dense, scaled)
    assert len(scaled) == 14 and 0 < diff["output"]["kl_divergence"] < 1e-3
    assert 0 < diff["output"]["logits_max_abs"] < 1 and diff["output"]["top1_agreement"] is not None


@pytest.mark.parametrize("name", list(SHAPES))
def test_dequantize_verify_passes_where_transformers_is_wrong_too(fp8, tmp_path, name, capsys):
    """`--verify` compares with transformers' FP8 dequantization, and for the weights with a
    partial block (which transformers mis-scales) with an element-by-element recomputation."""
    code, report = builders.run_json(
        capsys, "dequantize", fp8[name], tmp_path / "out", "--dtype", "bfloat16", "--verify"
    )
    assert code == 0, builders.failing_checks(report)
    messages = [f["message"] for f in report["findings"]]
    assert any("21 tensors bit-identical to the format's reference" in m for m in messages), messages
