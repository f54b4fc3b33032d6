"""torchao checkpoints (quant_method "torchao"): header checks, `qfinal dequantize`, in-memory
dequantize and `qfinal load`, each compared bit for bit with torchao / transformers.

The fixtures are made by torchao itself: a tiny Llama quantized on load with transformers'
TorchAoConfig (int8 weight-only, and intx int4 per group of 32) and written by save_pretrained as
safetensors. The reference for every dequantized weight is `weight.dequantize()` of the tensor
subclass transformers rebuilds from that checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402

import qfinal  # noqa: E402, F401  (first: it drops torchao's import-time log records)

torchao_quant = pytest.importorskip("torchao.quantization")
tf.logging.set_verbosity_error()

SCHEMES = {
    "int8": lambda: torchao_quant.Int8WeightOnlyConfig(),
    "int4": lambda: torchao_quant.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=torchao_quant.PerGroup(32)),
}
QUANTIZED = 14  # the q/k/v/o/gate/up/down projections of two layers


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return builders.llama(tmp_path_factory.mktemp("torchao") / "plain", tied=False)


@pytest.fixture(scope="module")
def torchao_ckpt(plain, tmp_path_factory):
    """name -> a checkpoint torchao quantized and transformers saved (safetensors)."""
    root = tmp_path_factory.mktemp("torchao-ckpt")
    out = {}
    for name, make in SCHEMES.items():
        model = tf.LlamaForCausalLM.from_pretrained(
            plain, dtype=torch.bfloat16, quantization_config=tf.TorchAoConfig(make())
        )
        model.save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def theirs(torchao_ckpt):
    """name -> the model transformers loads from the checkpoint (torchao tensor subclasses)."""
    return {name: tf.LlamaForCausalLM.from_pretrained(path).eval() for name, path in torchao_ckpt.items()}


def quantized_weights(model) -> dict[str, object]:
    return {k: v for k, v in model.state_dict().items() if hasattr(v, "qdata")}


# ----------------------------------------------------------------------------------------- layout


def test_checkpoint_layout_is_what_the_format_reads(torchao_ckpt):
    """What torchao's flattening writes: `_weight_qdata` I8, `_weight_scale`, `_weight_zero_point`
    per quantized Linear, and per-weight metadata transformers rebuilds the subclass from."""
    for name, path in torchao_ckpt.items():
        with safe_open(str(path / "model.safetensors"), "pt") as fh:
            keys, metadata = set(fh.keys()), fh.metadata()
        qdata = sorted(k for k in keys if k.endswith("._weight_qdata"))
        assert len(qdata) == QUANTIZED, name
        for key in qdata:
            module = key.removesuffix("._weight_qdata")
            assert {f"{module}._weight_scale", f"{module}._weight_zero_point"} <= keys
            meta = json.loads(metadata[f"{module}.weight"])
            assert meta["_type"] == ("Int8Tensor" if name == "int8" else "IntxUnpackedToInt8Tensor")
        assert "lm_head.weight" in keys and "tensor_names" in metadata


# ----------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name", list(SCHEMES))
def test_validate_fast_passes(capsys, torchao_ckpt, name):
    code, report = builders.run_json(capsys, "validate", torchao_ckpt[name], "--fast")
    assert code == 0, builders.failing_checks(report)
    quant = [f for f in report["findings"] if f["check"] == "quantization_config"]
    assert [f["severity"] for f in quant] == ["info"]
    assert f"{QUANTIZED} quantized weight(s)" in quant[0]["message"]
    assert ("torchao-int8" if name == "int8" else "torchao-intx-int4, group 32") in quant[0]["message"]


Q = "model.layers.0.self_attn.q_proj"
BROKEN = {
    "missing_scale": ("int4", lambda t: t.pop(f"{Q}._weight_scale"), None),
    "missing_zero_point": ("int4", lambda t: t.pop(f"{Q}._weight_zero_point"), None),
    "scale_for_group_64": (
        "int4",
        lambda t: t.update({f"{Q}._weight_scale": t[f"{Q}._weight_scale"][:, :1].contiguous()}),
        None,
    ),
    "qdata_int16": ("int8", lambda t: t.update({f"{Q}._weight_qdata": t[f"{Q}._weight_qdata"].short()}), None),
    "stray_component": ("int8", lambda t: t.update({"model.norm._weight_scale": torch.ones(64, 1)}), None),
    "plain_beside_components": ("int8", lambda t: t.update({f"{Q}.weight": torch.zeros(64, 64)}), None),
    "metadata_dtype": (
        "int8",
        None,
        lambda m: m.update({f"{Q}.weight": m[f"{Q}.weight"].replace('"bfloat16"', '"float16"')}),
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_validate_fast_fails_on_bad_quant_state(capsys, torchao_ckpt, tmp_path, broken):
    name, edit, metadata_edit = BROKEN[broken]
    path = builders.edited_copy(torchao_ckpt[name], tmp_path / broken, edit, metadata_edit=metadata_edit)
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    assert "quantization_config" in builders.failing_checks(report)


def test_dropped_metadata_is_one_line_exit_2(capsys, torchao_ckpt, tmp_path):
    """transformers' torchao quantizer raises ValueError on a file whose metadata lost
    `tensor_names`: qfinal names the checkpoint and the cause in one line, exit 2 (not an internal
    error), in load and in `validate --fast` alike."""
    path = builders.edited_copy(
        torchao_ckpt["int4"], tmp_path / "no_metadata", metadata_edit=lambda m: m.pop("tensor_names")
    )
    for argv in (("validate", path, "--fast"), ("load", path)):
        code, _out, err = builders.run_cli(capsys, *argv)
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert "torchao quantizer cannot prepare the model" in line and "metadata" in line


def test_unsupported_torchao_config_is_refused(capsys, torchao_ckpt, tmp_path):
    """int4 weight-only (tinygemm packing) has no CPU path: validate says so, dequantize refuses."""
    int4wo = {"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {}}
    path = builders.edited_copy(
        torchao_ckpt["int4"], tmp_path / "int4wo", config_edit=lambda qc: qc["quant_type"].update(default=int4wo)
    )
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    (finding,) = builders.failing_checks(report)["quantization_config"]
    assert "Int4WeightOnlyConfig" in finding["message"]
    code, _out, err = builders.run_cli(capsys, "dequantize", path, tmp_path / "out")
    assert code == 2 and "Int4WeightOnlyConfig" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- dequantize


@pytest.fixture(scope="module")
def dequantized(torchao_ckpt, tmp_path_factory):
    """name -> OUT of `qfinal dequantize SRC OUT --dtype bfloat16`, run through the CLI."""
    return builders.dequantize_each(torchao_ckpt, tmp_path_factory.mktemp("torchao-out"), "bfloat16")


@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_equals_torchao(theirs, dequantized, name):
    """Every weight equals torchao's own `dequantize()` of the subclass transformers loads; every
    other tensor is copied; the result loads as a plain model."""
    out = dequantized[name]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    written = load_file(out / "model.safetensors")
    state = theirs[name].state_dict()
    weights = quantized_weights(theirs[name])
    assert len(weights) == QUANTIZED
    assert set(written) == set(state)
    for key, value in written.items():
        expected = weights[key].dequantize() if key in weights else state[key]
        assert builders.bits_equal(value, expected), key
    plain_model = tf.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert getattr(plain_model, "hf_quantizer", None) is None
    assert all(builders.bits_equal(plain_model.state_dict()[k], v) for k, v in written.items())


def test_dequantize_float32_is_torchao_cast_once(theirs, torchao_ckpt, tmp_path, capsys):
    """--dtype float32: torchao's value in the weight's dtype (bfloat16), then cast."""
    code, _out, err = builders.run_cli(
        capsys, "dequantize", torchao_ckpt["int8"], tmp_path / "f32", "--dtype", "float32"
    )
    assert code == 0, err
    written = load_file(tmp_path / "f32" / "model.safetensors")
    for key, weight in quantized_weights(theirs["int8"]).items():
        assert builders.bits_equal(written[key], weight.dequantize().float()), key


# ----------------------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("name", list(SCHEMES))
def test_transformers_cannot_dequantize_in_memory_qfinal_can(torchao_ckpt, dequantized, name):
    from qfinal.formats import FORMATS, loaded_method

    model = tf.LlamaForCausalLM.from_pretrained(torchao_ckpt[name]).eval()
    with pytest.raises(NotImplementedError):
        model.dequantize()
    expected_method = "torchao-int8" if name == "int8" else "torchao-intx-int4"
    assert loaded_method(model) == expected_method
    original = {n: type(m).__name__ for n, m in model.named_modules()}
    FORMATS["torchao"].dequantize_in_memory(model, torch.bfloat16, original)
    assert loaded_method(model) is None and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    written = load_file(dequantized[name] / "model.safetensors")
    state = model.state_dict()
    assert all(type(v) is torch.Tensor or isinstance(v, torch.nn.Parameter) for v in state.values())
    for key, value in written.items():
        assert builders.bits_equal(state[key], value), key


# ----------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("name", list(SCHEMES))
def test_load_equals_transformers(torchao_ckpt, theirs, name):
    """transformers' torchao quantizer rebuilds these subclasses on the CPU bit for bit, so qfinal
    loads through it: the same components, the same dequantized values, the same logits."""
    from qfinal.formats import FORMATS
    from qfinal.ops.load import load

    assert FORMATS["torchao"].load_refusal(json.loads((torchao_ckpt[name] / "config.json").read_text())) is None
    ours = load(torchao_ckpt[name]).model
    ref = theirs[name]
    mine, their_weights = quantized_weights(ours), quantized_weights(ref)
    assert set(mine) == set(their_weights) and len(mine) == QUANTIZED
    stored = load_file(torchao_ckpt[name] / "model.safetensors")
    for key, weight in mine.items():
        module = key.removesuffix(".weight")
        for part in ("qdata", "scale", "zero_point"):
            assert builders.bits_equal(getattr(weight, part), stored[f"{module}._weight_{part}"]), (key, part)
        assert builders.bits_equal(weight.dequantize(), their_weights[key].dequantize()), key
    for key, value in ours.state_dict().items():
        if key not in mine:
            assert builders.bits_equal(value, ref.state_dict()[key]), key
    probe = builders.probe_inputs(ref)
    with torch.no_grad():
        assert builders.bits_equal(ours(**probe).logits, ref(**probe).logits)


def test_cli_is_quiet_about_torchao(torchao_ckpt):
    """A fresh `qfinal validate --fast` (which imports torchao through transformers) prints nothing
    of torchao's kernel-loading log or torch's deprecation warning."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qfinal", "validate", str(torchao_ckpt["int8"]), "--fast", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Failed to load" not in proc.stderr and "_pytree" not in proc.stderr
    assert proc.stderr.strip() == ""


def test_dequantize_needs_no_torchao(torchao_ckpt, dequantized, tmp_path):
    """`qfinal dequantize` reads torchao checkpoints in plain torch: with torchao unimportable (and
    so unavailable to transformers) it writes the same bytes."""
    child = (
        "import sys; sys.modules['torchao'] = None\n"
        "from qfinal.cli.app import main\n"
        "main(['dequantize', sys.argv[1], sys.argv[2], '--dtype', 'bfloat16', '-q'])\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", child, str(torchao_ckpt["int4"]), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == (dequantized["int4"] / "model.safetensors").read_bytes()


def test_sharded_checkpoint(plain, theirs, tmp_path, capsys):
    """Components of one weight may sit in different shards; the metadata is per shard."""
    model = tf.LlamaForCausalLM.from_pretrained(
        plain, dtype=torch.bfloat16, quantization_config=tf.TorchAoConfig(SCHEMES["int4"]())
    )
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    code, report = builders.run_json(capsys, "validate", tmp_path / "sharded", "--fast")
    assert code == 0, builders.failing_checks(report)
    code, _out, err = builders.run_cli(
        capsys, "dequantize", tmp_path / "sharded", tmp_path / "out", "--dtype", "bfloat16"
    )
    assert code == 0, err
    written = builders.read_tensors(tmp_path / "out")
    for key, weight in quantized_weights(theirs["int4"]).items():
        assert builders.bits_equal(written[key], weight.dequantize()), key


@pytest.mark.parametrize("name", list(SCHEMES))
def test_diff_reports_what_torchao_cost_per_layer_and_in_logits(plain, theirs, torchao_ckpt, tmp_path, capsys, name):
    """`qfinal diff TORCHAO DENSE_ORIGINAL`: every quantized weight shows torchao's own
    dequantization error against the bfloat16 weight it was quantized from (float64), the logits
    their cost; the rest is identical. The dense original is the fixture's model as torchao saw it."""
    tf.LlamaForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).save_pretrained(tmp_path / "dense")
    code, report = builders.run_json(capsys, "diff", torchao_ckpt[name], tmp_path / "dense")
    assert code == 1  # quantization changed values: not identical, and no tolerance was given
    diff = report["extra"]["diff"]
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    reference = {k: w.dequantize() for k, w in quantized_weights(theirs[name]).items()}
    assert len(reference) == QUANTIZED
    builders.assert_diff_rows(diff["tensors"], dense, reference)
    # the logits are transformers' torchao model's own, run with torchao's kernels
    expected = builders.output_cost(tmp_path / "dense", torch.bfloat16, candidate=theirs[name])
    builders.assert_output_cost(diff["output"], expected)


def test_diff_raw_compares_what_is_stored(torchao_ckpt, capsys):
    """`qfinal diff --raw` compares a torchao weight as the components the checkpoint holds
    (`_weight_qdata`, `_weight_scale`, `_weight_zero_point`), bit for bit, not its logical tensor."""
    from qfinal.compare.views import DequantView
    from qfinal.ops.load import load

    path = torchao_ckpt["int4"]
    stored = load_file(path / "model.safetensors")
    view = DequantView(load(path).model, None, dequantize=False)
    assert set(view) == set(stored)
    assert all(builders.bits_equal(view[key], value) for key, value in stored.items())
    code, report = builders.run_json(capsys, "diff", path, path, "--raw")
    assert code == 0 and len(report["extra"]["diff"]["tensors"]) == len(stored)
