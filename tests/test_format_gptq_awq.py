"""GPTQ and AWQ (GEMM) checkpoints: header checks, `qfinal dequantize` (and --verify), `qfinal load`.

Fixtures and references both come from GPTQModel, run once in a child interpreter
(tests/gptq_awq_fixtures.py as a script, `made_by_gptqmodel`) that finds it in `.venv/gptqmodel-only`: its import
patches safetensors and transformers, which the rest of the suite must not see. A tiny Llama's
projections are packed by GPTQModel's own packers (`TorchLinear.pack_original` then its v2 -> v1
export; `AwqTorchLinear.pack`) from per-group min/max scales, with zero points of 0 and 2^bits-1
forced on two output rows (the v1 borrow case), and saved as GPTQModel saves them. Every reference
weight is GPTQModel's own load path: v1 -> v2 conversion and `TorchLinear.dequantize_weight` (the
torch backend), AWQ's `dequantize_gemm` (the torch_awq backend).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402
from gptq_awq_fixtures import (  # noqa: E402
    LAYERS,
    ROLES,
    VARIANTS,
    gptqmodel_env,
    made_by_gptqmodel,
    quantization_config,
)

# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The fixtures and references, built by GPTQModel in a child interpreter that finds it in
    `.venv/gptqmodel-only` (the Makefile installs it there) or wherever this interpreter does."""
    return made_by_gptqmodel(tmp_path_factory.mktemp("gptq-awq") / "made")


@pytest.fixture(scope="module")
def dequantized(made, tmp_path_factory) -> dict[str, Path]:
    """name -> OUT of `qfinal dequantize SRC OUT --dtype float16`, run through the CLI."""
    sources = {name: made / name for name in VARIANTS}
    return builders.dequantize_each(sources, tmp_path_factory.mktemp("gptq-awq-out"), "float16")


def spec_config(spec) -> dict:
    """A config.json dict declaring `spec`'s quantization_config."""
    return {"quantization_config": quantization_config(spec)}


def stored_weights(name: str, tensors: dict):
    """(format, its StoredWeight, read) for layer case `name`, found from its headers as dequantize finds it."""
    from qfinal.checkpoint.dtypes import safetensors_dtype
    from qfinal.formats import format_for

    spec = LAYERS[name]
    parts = {f"{name}.{role}": t for role, t in tensors.items() if role != "reference"}
    headers = {k: (safetensors_dtype(t.dtype), list(t.shape)) for k, t in parts.items()}
    fmt = format_for(spec_config(spec))
    (weight,) = fmt.find_weights(headers, parts.__getitem__, fmt.scheme(spec_config(spec), "test"), "test")
    return fmt, weight, parts.__getitem__


def layer_tensors(made: Path, name: str) -> dict[str, torch.Tensor]:
    everything = load_file(made / "layers.safetensors")
    return {k.removeprefix(f"{name}."): v for k, v in everything.items() if k.startswith(f"{name}.")}


# ----------------------------------------------------------------------------------------- single layers


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_equals_gptqmodel(made, name):
    """Ragged shapes (72 inputs: not a whole number of groups of 32, nor of 8-bit words' 4 codes for
    every width; 36 outputs: qzeros' last word half full), 2/4/8 bits, act-order, v1 and v2."""
    tensors = layer_tensors(made, name)
    fmt, weight, read = stored_weights(name, tensors)
    assert weight.shape == list(LAYERS[name]["shape"])
    ours = fmt.dequantize(weight, read, "test")
    assert builders.bits_equal(ours, tensors["reference"]), name


def test_v1_zero_points_decode_by_whole_word(made):
    """A true zero point of 0 is stored as -1: it borrows from the next field of the int32 word.
    Adding 1 to each 4-bit field after unpacking (the tempting decode) gets those rows wrong."""
    from qfinal.formats.gptq import dequantize_gptq

    t = layer_tensors(made, "gptq4_seq_gptq")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    per_field = (((t["qzeros"].unsqueeze(2) >> shifts) & 15) + 1).reshape(t["qzeros"].shape[0], -1)[:, :36]
    codes = ((t["qweight"].unsqueeze(1) >> shifts[None, :, None]) & 15).reshape(-1, 36)[:72]
    g = t["g_idx"].long()
    naive = (t["scales"][g] * (codes - per_field[g])).t()
    ours = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 32, True, 72)
    assert builders.bits_equal(ours, t["reference"])
    wrong_rows = (naive != t["reference"]).any(dim=1).nonzero().flatten().tolist()
    assert 0 in wrong_rows  # the row whose zero points are 0


# ----------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dequantized_loads_plain_and_equals_gptqmodel(made, dequantized, name):
    import transformers as tf

    out = dequantized[name]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    written = load_file(out / "model.safetensors")
    refs = load_file(made / "refs" / f"{name}.safetensors")
    assert len(refs) == 14
    for key, reference in refs.items():
        assert builders.bits_equal(written[key], reference), key
    source = load_file(made / name / "model.safetensors")
    for key in set(written) - set(refs):
        assert builders.bits_equal(written[key], source[key]), key  # fp16 in, fp16 out: copied
    assert not any(k.endswith(ROLES) for k in written)
    model = tf.LlamaForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert getattr(model, "hf_quantizer", None) is None
    state = model.state_dict()
    for key, reference in refs.items():
        assert builders.bits_equal(state[key], reference), key


def test_dequantize_to_bfloat16_casts_the_library_result_once(made, tmp_path):
    from qfinal.ops.dequantize import dequantize_checkpoint

    dequantize_checkpoint(made / "gptq4_act_sym", tmp_path / "out", dtype="bfloat16")
    written = load_file(tmp_path / "out" / "model.safetensors")
    for key, reference in load_file(made / "refs" / "gptq4_act_sym.safetensors").items():
        assert builders.bits_equal(written[key], reference.to(torch.bfloat16)), key


def test_verify_compares_with_gptqmodel(made, tmp_path):
    """`--verify` rebuilds the reference with GPTQModel's own torch kernels (in a child that finds
    it): every tensor bit-identical and the logits equal, for GPTQ act-order and AWQ."""
    script = (
        "import sys; from qfinal.ops.dequantize import run_dequantize\n"
        "for name in sys.argv[3:]:\n"
        "    r = run_dequantize(sys.argv[1] + '/' + name, sys.argv[2] + '/' + name, verify=True)\n"
        "    found = [f for f in r.findings if f.check.startswith('dequantize_')]\n"
        "    print(name, [f.check + ':' + f.severity + ':' + f.message for f in found])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(made), str(tmp_path), "gptq4_act_sym", "awq"],
        env=gptqmodel_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()[-2:]
    for line in lines:
        assert "dequantize_tensors:info:21 tensors bit-identical" in line, line
        assert "max abs difference 0 " in line and ":error:" not in line, line


def test_verify_without_gptqmodel_is_refused_with_the_reason(made, tmp_path):
    from qfinal.errors import SourceError
    from qfinal.ops.dequantize import run_dequantize

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is importable here")
    with pytest.raises(SourceError, match="gptqmodel is not installed"):
        run_dequantize(made / "awq", tmp_path / "out", verify=True)


# ----------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("name", ["gptq4", "awq"])
def test_load_dequantizes_on_load_exactly_as_dequantize_writes(made, dequantized, name):
    """transformers loads these only through optimum / gptqmodel, into packed kernel modules:
    qfinal's load rebuilds each weight dense, bit for bit what `qfinal dequantize` writes."""
    from qfinal.ops.load import load

    result = load(made / name, dtype="float16")
    assert result.report.ok, [f.message for f in result.report.findings if f.severity == "error"]
    assert result.report.quantization.startswith(
        f"{VARIANTS[name]['method']} int4 group 32 asym dequantized to float16 on load"
    )
    state = result.model.state_dict()
    written = load_file(dequantized[name] / "model.safetensors")
    assert set(written) == {k for k in state if "inv_freq" not in k}
    for key, tensor in written.items():
        assert builders.bits_equal(state[key], tensor), key
    refs = load_file(made / "refs" / f"{name}.safetensors")
    assert {c.module for c in result.report.keys.converted} == {k.removesuffix(".weight") for k in refs}


def test_transformers_cannot_load_them_here(made):
    """Without optimum and gptqmodel (not qfinal's dependencies: gptqmodel's requirements pull a
    CUDA torch) transformers refuses both; qfinal's load above works on the same folders."""
    import transformers as tf

    missing = [
        (n, lib) for n, lib in (("gptq4", "optimum"), ("awq", "gptqmodel")) if importlib.util.find_spec(lib) is None
    ]
    if not missing:
        pytest.skip("optimum and gptqmodel are both importable here")
    for name, library in missing:
        with pytest.raises(ImportError, match=library):
            tf.LlamaForCausalLM.from_pretrained(made / name)


# ----------------------------------------------------------------------------------------- validate --fast


@pytest.mark.parametrize("name", list(VARIANTS))
def test_validate_fast_passes(capsys, made, name):
    code, report = builders.run_json(capsys, "validate", made / name, "--fast")
    assert code == 0, builders.failing_checks(report)
    quant = [f for f in report["findings"] if f["check"] == "quantization_config"]
    assert [f["severity"] for f in quant] == ["info"], quant
    assert f"{VARIANTS[name]['method']} int{VARIANTS[name]['bits']}" in quant[0]["message"]
    assert "14 packed weight(s)" in quant[0]["message"]


Q = "model.layers.0.self_attn.q_proj"
BROKEN_GPTQ = {
    "missing_qzeros": (lambda t: t.pop(f"{Q}.qzeros"), None, "lacks its qzeros"),
    "scales_one_group": (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1].clone()}), None, "scales has shape"),
    "f32_scales": (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()}), None, "not F16 or BF16"),
    "narrow_qzeros": (lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:, :-1].clone()}), None, "qzeros has shape"),
    "stray_g_idx": (lambda t: t.update({"model.norm.g_idx": torch.zeros(64, dtype=torch.int32)}), None, "no qweight"),
    "dense_beside_packed": (lambda t: t.update({f"{Q}.weight": torch.zeros(64, 64).half()}), None, "both weight"),
    "group_64": (None, lambda qc: qc.update(group_size=64), "scales has shape"),
}
BROKEN_AWQ = {
    "awq_g_idx": (lambda t: t.update({f"{Q}.g_idx": torch.zeros(64, dtype=torch.int32)}), None, "no g_idx"),
    "awq_qzeros_rows": (lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:1].clone()}), None, "qzeros has shape"),
}
BROKEN = {**{k: ("gptq4", *v) for k, v in BROKEN_GPTQ.items()}, **{k: ("awq", *v) for k, v in BROKEN_AWQ.items()}}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_validate_fast_fails_on_bad_quant_state(capsys, made, tmp_path, broken):
    source, edit, config_edit, message = BROKEN[broken]
    path = builders.edited_copy(made / source, tmp_path / broken, edit, config_edit)
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    failing = builders.failing_checks(report).get("quantization_config", [])
    assert any(message in f["message"] for f in failing), failing


UNREADABLE_CONFIG = {
    "bits_3": ("gptq4", dict(bits=3), "pack codes across words"),
    "marlin_format": ("gptq4", dict(checkpoint_format="marlin"), "'marlin' is not one"),
    "string_sym": ("gptq4", dict(sym="yes"), "sym must be true or false"),
    "awq_gemv": ("awq", dict(version="gemv"), "'gemv' is not one"),
    "awq_8bit": ("awq", dict(bits=8), "4-bit GEMM"),
    "awq_channel": ("awq", dict(group_size=-1), "group_size must be a positive integer"),
}


@pytest.mark.parametrize("case", list(UNREADABLE_CONFIG))
def test_unreadable_quantization_config_is_refused_with_the_reason(capsys, made, tmp_path, case):
    """A layout qfinal does not decode is named, never guessed: the header check reports it, and
    validate --fast / dequantize stop with it in one line (exit 2)."""
    from qfinal.checkpoint.inventory import inspect_checkpoint
    from qfinal.checks.quant import quantization_findings

    source, fields, message = UNREADABLE_CONFIG[case]
    path = builders.edited_copy(made / source, tmp_path / case, config_edit=lambda qc: qc.update(fields))
    raw = json.loads((path / "config.json").read_text())
    findings = quantization_findings(raw, inspect_checkpoint(path))
    assert [f.severity for f in findings] == ["error"] and message in findings[0].message
    for argv in (["validate", path, "--fast"], ["dequantize", path, tmp_path / "out"]):
        code, _out, err = builders.run_cli(capsys, *argv)
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "out").exists()


def test_act_order_without_g_idx_fails(capsys, made, tmp_path):
    path = builders.edited_copy(made / "gptq4_act_sym", tmp_path / "no_g_idx", lambda t: t.pop(f"{Q}.g_idx"))
    code, report = builders.run_json(capsys, "validate", path, "--fast")
    assert code == 1
    failing = builders.failing_checks(report)["quantization_config"]
    assert any("lacks its g_idx" in f["message"] for f in failing), failing


@pytest.mark.parametrize("broken", ["missing_qzeros", "group_64", "awq_qzeros_rows"])
def test_dequantize_and_load_refuse_bad_quant_state(capsys, made, tmp_path, broken):
    from qfinal.errors import CheckpointError
    from qfinal.ops.dequantize import dequantize_checkpoint

    source, edit, config_edit, message = BROKEN[broken]
    path = builders.edited_copy(made / source, tmp_path / broken, edit, config_edit)
    with pytest.raises(CheckpointError, match=message):
        dequantize_checkpoint(path, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()
    code, _out, err = builders.run_cli(capsys, "load", path)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert message in line


@pytest.mark.parametrize("name", ["gptq4_act_sym", "awq"])
def test_diff_reports_what_quantizing_cost_per_layer_and_in_logits(capsys, made, tmp_path, name):
    """`qfinal diff QUANTIZED DENSE_ORIGINAL`: the quantized side is dequantized on load, so every
    quantized weight shows GPTQModel's dequantization error against the fp16 weight it was packed
    from (float64), the logits their cost; the rest is identical."""
    import transformers as tf

    torch.manual_seed(builders.SEED)  # the fixture's model before packing (gptq_awq_fixtures.build)
    config = tf.LlamaConfig(tie_word_embeddings=False, **builders.LLAMA)
    tf.LlamaForCausalLM(config).to(torch.float16).save_pretrained(tmp_path / "dense")
    code, report = builders.run_json(capsys, "diff", made / name, tmp_path / "dense")
    assert code == 1  # quantization changed values: not identical, and no tolerance was given
    diff = report["extra"]["diff"]
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    refs = load_file(made / "refs" / f"{name}.safetensors")
    assert len(refs) == 14
    builders.assert_diff_rows(diff["tensors"], dense, refs)
    builders.assert_output_cost(diff["output"], builders.output_cost(tmp_path / "dense", torch.float16, refs))
