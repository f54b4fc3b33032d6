"""`qfinal diff` and `qfinal load --quality`, end to end through the CLI's error boundary.

Every number the commands report is checked against an independent computation: bitsandbytes'
`dequantize_4bit` on the packed weights of a checkpoint quantized by plain transformers, the
original float tensors read from safetensors, and logits of models loaded with `from_pretrained`
on the probe batch as documented (CPU generator seeded 0, 2 x 16 ids in [0, vocab)).
"""

from __future__ import annotations

import math
import shutil

import bitsandbytes.functional as F
import builders
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

PERTURBED, DELTA = builders.PERTURBED, builders.DELTA
QS = ".quant_state.bitsandbytes__nf4"


# ------------------------------------------------------------------------------------- helpers


def tensors_by_name(report: dict) -> dict[str, dict]:
    return {t["name"]: t for t in report["extra"]["diff"]["tensors"]}


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def rel_and_max(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    d = f64(candidate) - f64(reference)
    return float(d.norm() / f64(reference).norm()), float(d.abs().max())


def bnb_dequantized(folder) -> dict[str, torch.Tensor]:
    """weight name -> bitsandbytes' dequantize_4bit of the packed weight stored in `folder`."""
    sd = load_file(folder / "model.safetensors")
    out = {}
    for key in sd:
        if key.endswith(QS):
            base = key[: -len(QS)]
            stats = {k[len(base) + 1 :]: v for k, v in sd.items() if k.startswith(base + ".")}
            state = F.QuantState.from_dict(stats, torch.device("cpu"))
            out[base] = F.dequantize_4bit(sd[base], state)
    assert out, f"no nf4 weights in {folder}"
    return out


@pytest.fixture(scope="module")
def files(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    llama = checkpoints["llama_tied"]
    copy = root / "llama_copy"
    shutil.copytree(llama, copy)
    perturbed = builders.perturbed_copy(llama, root / "llama_perturbed", PERTURBED, DELTA)
    nf4 = root / "nf4.yaml"
    nf4.write_text("quantize:\n  method: nf4\n")
    return {"root": root, "llama": llama, "copy": copy, "perturbed": perturbed, "nf4": nf4}


# ------------------------------------------------------------------------------------- diff


def test_identical_checkpoints(files, capsys):
    code, report = builders.run_json(capsys, "diff", files["copy"], files["llama"])
    assert code == 0
    assert report["command"] == "diff" and report["ok"] is True
    data = report["extra"]["diff"]
    assert data["identical"] is True and data["within_tolerances"] is True
    assert data["tensors"] and all(t["status"] == "identical" and t["bit_identical"] for t in data["tensors"])
    assert data["output"]["logits_max_abs"] == 0.0 and data["output"]["top1_agreement"] == 1.0
    assert data["output"]["kl_divergence"] == 0.0 and data["output"]["positions"] == 32
    assert {f["check"] for f in report["findings"]} == {"diff_keys", "diff_tensors", "diff_logits"}
    assert all(f["severity"] == "info" for f in report["findings"])

    code, out, err = builders.run_cli(capsys, "diff", files["copy"], files["llama"], "--raw")  # stored bits, human view
    assert code == 0, err
    assert "IDENTICAL" in out and "bit-identical" in out and "raw values" in out


def test_one_perturbed_tensor_is_named(files, capsys, tmp_path, monkeypatch):
    html = tmp_path / "diff.html"
    code, report = builders.run_json(capsys, "diff", files["perturbed"], files["llama"], "--html", html)
    assert code == 1 and report["ok"] is False
    tensors = tensors_by_name(report)
    assert [n for n, t in tensors.items() if t["status"] != "identical"] == [PERTURBED]
    t = tensors[PERTURBED]
    assert t["status"] == "different" and t["bit_identical"] is False
    a = load_file(files["perturbed"] / "model.safetensors")[PERTURBED]
    b = load_file(files["llama"] / "model.safetensors")[PERTURBED]
    rel, max_abs = rel_and_max(a, b)
    assert t["max_abs"] == pytest.approx(max_abs, rel=1e-12) and abs(max_abs - DELTA) < 1e-6
    assert t["rel_error"] == pytest.approx(rel, rel=1e-9)
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [f["key"] for f in errors if f["check"] == "diff_tensors" and f["key"]] == [PERTURBED]
    assert {f["check"] for f in errors} == {"diff_tensors", "diff_logits"}

    # Output metrics == a direct computation on the documented probe batch.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    with torch.no_grad():
        la = f64(tf.LlamaForCausalLM.from_pretrained(files["perturbed"]).eval()(input_ids=ids).logits)
        lb = f64(tf.LlamaForCausalLM.from_pretrained(files["llama"]).eval()(input_ids=ids).logits)
    la, lb = la.reshape(-1, la.shape[-1]), lb.reshape(-1, lb.shape[-1])
    pb = torch.softmax(lb, -1)
    kl = (pb * (torch.log_softmax(lb, -1) - torch.log_softmax(la, -1))).sum(-1).mean()
    out = report["extra"]["diff"]["output"]
    assert out["positions"] == 32
    assert out["logits_max_abs"] == pytest.approx(float((la - lb).abs().max()), rel=1e-12)
    assert out["logits_max_abs"] > 0
    assert out["kl_divergence"] == pytest.approx(float(kl), rel=1e-6, abs=1e-15)
    assert out["top1_agreement"] == float((la.argmax(-1) == lb.argmax(-1)).double().mean())
    assert report["extra"]["diff"]["probe"]["seed"] == 0

    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and PERTURBED in page and "<svg" in page
    assert "http://" not in page and "https://" not in page

    # Within tolerances: exit 0, the difference still reported (a wide terminal keeps names whole).
    monkeypatch.setenv("COLUMNS", "200")
    code, out_text, err = builders.run_cli(
        capsys,
        "diff",
        files["perturbed"],
        files["llama"],
        "--max-abs",
        "0.6",
        "--rel-error",
        "1",
        "--logits-max-abs",
        "10",
        "--min-top1",
        "0",
    )
    assert code == 0, err
    assert PERTURBED in out_text and "WITHIN TOLERANCES" in out_text


def test_nf4_candidate_matches_bitsandbytes(files, checkpoints, capsys, monkeypatch):
    code, report = builders.run_json(capsys, "diff", files["llama"], files["llama"], "--config-a", files["nf4"])
    assert code == 1  # exact equality is the default tolerance
    assert report["quantization"] == "nf4 vs none"
    tensors = tensors_by_name(report)
    deq = bnb_dequantized(checkpoints.quantized("llama_tied", "nf4"))
    original = load_file(files["llama"] / "model.safetensors")
    assert {n for n, t in tensors.items() if t["status"] != "identical"} == set(deq)
    assert not any(t["status"] in ("only_a", "only_b", "shape") for t in tensors.values())
    rels = []
    for name, value in deq.items():
        rel, max_abs = rel_and_max(value, original[name])  # A = nf4 candidate, B = float reference
        assert tensors[name]["rel_error"] == pytest.approx(rel, rel=1e-9), name
        assert tensors[name]["max_abs"] == pytest.approx(max_abs, rel=1e-9), name
        rels.append(rel)
    assert 0.05 < min(rels) <= max(rels) < 0.15  # nf4 on Gaussian-initialized weights: about 9%

    # the terminal view charts the same errors by layer, one bar per differing tensor, longest for the worst
    comparison_rows = {t["name"]: t["rel_error"] for t in tensors.values() if t["status"] != "identical"}
    monkeypatch.setenv("COLUMNS", "160")  # names unfolded, one row per line
    code, out, _err = builders.run_cli(capsys, "diff", files["llama"], files["llama"], "--config-a", files["nf4"])
    assert code == 1 and "Relative error by layer (14 differing tensor(s))" in out
    lines = {name: line for line in out.splitlines() for name in comparison_rows if name in line and "█" in line}
    assert set(lines) == set(comparison_rows)
    worst = max(comparison_rows, key=comparison_rows.get)
    assert lines[worst].count("█") == 20  # the chart's full width is the largest error
    by_error = sorted(comparison_rows, key=comparison_rows.get)
    lengths = [lines[name].count("█") for name in by_error]
    assert lengths == sorted(lengths)  # bars grow with the error
    top = comparison_rows[worst]
    for name, line in lines.items():  # ... in proportion to it (rounded to whole cells)
        assert abs(line.count("█") - 20 * comparison_rows[name] / top) <= 1, (name, line)


def test_gpt2_conv1d_aligns_with_quantized_linear(files, checkpoints, capsys):
    """B = GPT-2 quantized to nf4 (Linear4bit, (out, in)), A = float GPT-2 (Conv1D, (in, out))."""
    gpt2 = checkpoints["gpt2"]
    code, report = builders.run_json(
        capsys,
        "diff",
        gpt2,
        gpt2,
        "--config-b",
        files["nf4"],
        "--rel-error",
        "0.15",
        "--max-abs",
        "0.05",
        "--logits-max-abs",
        "0.5",
        "--min-top1",
        "0.9",
    )
    assert code == 0, report["findings"]
    data = report["extra"]["diff"]
    assert data["within_tolerances"] is True and data["identical"] is False
    tensors = tensors_by_name(report)
    deq = bnb_dequantized(checkpoints.quantized("gpt2", "nf4"))
    original = load_file(gpt2 / "model.safetensors")
    assert {n for n, t in tensors.items() if t["status"] != "identical"} == set(deq)
    assert len(deq) == 8 and all(".c_" in n for n in deq)
    for name, value in deq.items():
        t = tensors[name]
        stored = original[name]  # Conv1D: (in, out)
        assert t["shape_a"] == t["shape_b"] == list(value.shape) == list(stored.shape[::-1])
        rel, max_abs = rel_and_max(stored.t(), value)  # A = float candidate, B = nf4 reference
        assert t["rel_error"] == pytest.approx(rel, rel=1e-9), name
        assert t["max_abs"] == pytest.approx(max_abs, rel=1e-9), name
    assert 0 < data["output"]["logits_max_abs"] < 0.5 and data["output"]["top1_agreement"] >= 0.9


def test_yaml_sides(files, capsys, tmp_path):
    """A YAML side names its model with `source:` (relative to the YAML); without it, it is the
    other side's model under that config."""
    side = files["root"] / "float-side.yaml"
    side.write_text("source: llama_copy\nvalidate:\n  check_nan: true\n")
    code, report = builders.run_json(capsys, "diff", files["nf4"], side)
    assert code == 1
    data = report["extra"]["diff"]
    assert data["a"]["source"] == data["b"]["source"] == str(files["copy"])
    assert data["a"]["quantize"] == "nf4" and data["b"]["quantize"] == "none"
    assert report["quantization"] == "nf4 vs none"
    assert sum(t["status"] == "different" for t in data["tensors"]) == 14


# ------------------------------------------------------------------------------------- quality


def test_load_quality_matches_bitsandbytes(checkpoints, capsys, tmp_path):
    gpt2 = checkpoints["gpt2"]
    cfg = tmp_path / "q.yaml"
    cfg.write_text("quantize:\n  method: nf4\nreport:\n  quality: true\n")
    html = tmp_path / "quality.html"
    code, report = builders.run_json(capsys, "load", gpt2, "-c", cfg, "--html", html)
    assert code == 0
    rows = {r["name"]: r for r in report["extra"]["quality"]}
    deq = bnb_dequantized(checkpoints.quantized("gpt2", "nf4"))
    original = load_file(gpt2 / "model.safetensors")
    assert {f"{n}.weight" for n in rows} == set(deq)
    for name, row in rows.items():
        rel, max_abs = rel_and_max(deq[f"{name}.weight"], original[f"{name}.weight"].t())
        assert row["rel_error"] == pytest.approx(rel, rel=1e-9), name
        assert row["max_abs"] == pytest.approx(max_abs, rel=1e-9), name
        assert row["quant"] == "nf4" and row["stack"] == "transformer.h"
        assert row["layer"] == int(name.split(".")[2]) and row["module_type"] == name.rsplit(".", 1)[1]
        assert row["shape"] == list(deq[f"{name}.weight"].shape)
    quality = [f for f in report["findings"] if f["check"] == "quality"]
    assert len(quality) == 1 and quality[0]["severity"] == "info" and "8 nf4 module(s)" in quality[0]["message"]
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "transformer.h.1.mlp.c_proj" in page and "<svg" in page

    code, out, err = builders.run_cli(capsys, "load", gpt2, "--quantize", "int8", "--quality")  # human: the bar chart
    assert code == 0, err
    assert "Quantization error by layer" in out and "█" in out and "int8 module(s)" in out


def test_load_quality_on_a_quantized_checkpoint_warns(checkpoints, capsys):
    code, report = builders.run_json(capsys, "load", checkpoints.quantized("gpt2", "nf4"), "--quality")
    assert code == 0
    assert report["extra"]["quality"] == []
    (finding,) = [f for f in report["findings"] if f["check"] == "quality"]
    assert finding["severity"] == "warning" and "already quantized" in finding["message"]


# ------------------------------------------------------------------------------------- bad input


def _bad_inputs(files, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("quantize: [nf4\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("quantise:\n  method: nf4\n")
    no_source = tmp_path / "other.yaml"
    no_source.write_text("dtype: float32\n")
    llama = files["llama"]
    return [
        (["diff", tmp_path / "missing", llama], "path does not exist"),
        (["diff", llama, llama, "--config-b", bad_yaml], "YAML syntax error"),
        (["diff", llama, llama, "--config-a", typo], "unknown key"),
        (["diff", llama, llama, "--config-a", tmp_path / "absent.yaml"], "config file not found"),
        (["diff", files["nf4"], no_source], "neither side names a model"),
        (["diff", files["nf4"], llama, "--config-a", no_source], "already a config file"),
        (["diff", llama, llama, "--min-top1", "1.5"], "--min-top1"),
        (["diff", llama, llama, "--max-abs", "nan"], "--max-abs"),
        (["diff", llama, llama, "--html", tmp_path / "nowhere" / "x.html"], "folder does not exist"),
        (["load", llama, "--quality", "--html", tmp_path / "nowhere" / "x.html"], "folder does not exist"),
    ]


def test_bad_input_exits_2_with_one_line(files, capsys, tmp_path):
    for argv, expected in _bad_inputs(files, tmp_path):
        code, out, err = builders.run_cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert "Traceback" not in err and out == "", (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qfinal: error:"), (argv, err)
        assert expected in lines[0], (argv, lines[0])


def test_tolerance_helpers():
    from qfinal.compare.tensors import Tolerances
    from qfinal.ops.diff import make_tolerances

    assert make_tolerances() == Tolerances()
    tol = make_tolerances(
        max_abs=0.1, rel_error=0.2, logits_max_abs=1, min_top1=0.5, max_kl=0.01, allow_dtype_change=True
    )
    assert (tol.max_abs, tol.rel_error, tol.logits_max_abs, tol.min_top1, tol.max_kl) == (0.1, 0.2, 1, 0.5, 0.01)
    assert tol.allow_dtype_change and math.isfinite(tol.max_abs)
