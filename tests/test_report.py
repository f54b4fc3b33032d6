"""The report lists exactly what happened: ties, key problems, conversions, skips; JSON schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

import qfinal
from qfinal.config import build_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("fixture", ["llama_tied", "t5", "gpt2", "bert"])
def test_tied_keys_are_the_models_and_share_storage(checkpoints, fixture):
    result = qfinal.load(checkpoints[fixture])
    declared = result.model.all_tied_weights_keys
    assert {(t.target, t.source) for t in result.report.keys.tied} == set(declared.items())
    assert declared, "every fixture here ties something"
    for tie in result.report.keys.tied:
        assert tie.shared
        assert result.model.get_parameter(tie.target) is result.model.get_parameter(tie.source)


def broken_copy(source: Path, dest: Path) -> Path:
    """The untied llama with one key removed, one extra key and one wrong shape."""
    shutil.copytree(source, dest)
    tensors = load_file(dest / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.ones(3)
    tensors["model.norm.weight"] = torch.ones(32)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_missing_unexpected_mismatched_are_exactly_reported(checkpoints, tmp_path):
    path = broken_copy(checkpoints["llama_untied"], tmp_path / "broken")
    report = qfinal.load(path).report
    assert report.keys.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert report.keys.unexpected == ["model.layers.0.extra.weight"]
    assert [(m.key, m.checkpoint_shape, m.model_shape) for m in report.keys.mismatched] == [
        ("model.norm.weight", [32], [64])
    ]
    errors = {(f.check, f.key) for f in report.findings if f.severity == "error"}
    assert errors == {
        ("missing_keys", "model.layers.1.mlp.up_proj.weight"),
        ("unexpected_keys", "model.layers.0.extra.weight"),
        ("shape_mismatch", "model.norm.weight"),
    }
    assert not report.ok


def test_cli_exit_1_and_json_for_a_broken_checkpoint(checkpoints, tmp_path, capsys):
    path = broken_copy(checkpoints["llama_untied"], tmp_path / "broken")
    code, out, _err = builders.run_cli(capsys, "load", str(path), "--json", "-")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["keys"]["missing"] == ["model.layers.1.mlp.up_proj.weight"]
    assert data["keys"]["mismatched"] == [{"key": "model.norm.weight", "checkpoint_shape": [32], "model_shape": [64]}]


@pytest.mark.parametrize(
    "fixture,head", [("llama_untied", "lm_head"), ("gpt2", "lm_head"), ("bert", "cls.predictions.decoder")]
)
def test_nf4_converts_every_quantizable_module_and_skips_the_head(checkpoints, fixture, head):
    from transformers.pytorch_utils import Conv1D

    plain = qfinal.load(checkpoints[fixture]).model
    quantizable = {n for n, m in plain.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    report = qfinal.load(checkpoints[fixture], quantize="nf4").report
    converted = {c.module for c in report.keys.converted}
    skipped = {s.module: s.reason for s in report.keys.skipped}
    assert converted | set(skipped) == quantizable
    assert head in skipped and "output head" in skipped[head]
    assert converted == quantizable - {head}
    assert {c.to for c in report.keys.converted} == {"Linear4bit"}
    assert {c.from_ for c in report.keys.converted} == ({"Conv1D"} if fixture == "gpt2" else {"Linear"})


def test_json_schema_fields(checkpoints, tmp_path, capsys):
    out = tmp_path / "report.json"
    code, _out, _err = builders.run_cli(
        capsys, "load", str(checkpoints["llama_tied"]), "--quantize", "nf4", "--json", str(out), "--quiet"
    )
    assert code == 0
    data = json.loads(out.read_text())
    for field in ("source", "model_class", "ok", "stages", "keys", "findings"):
        assert field in data
    assert data["model_class"] == "LlamaForCausalLM" and data["ok"] is True
    assert set(data["stages"][0]) >= {"name", "seconds", "peak_rss_bytes"}
    assert set(data["keys"]) >= {"tied", "missing", "unexpected", "mismatched", "converted", "skipped"}
    assert data["keys"]["tied"] == [{"target": "lm_head.weight", "source": "model.embed_tokens.weight", "shared": True}]
    assert set(data["keys"]["converted"][0]) == {"module", "from", "to"}
    assert set(data["keys"]["skipped"][0]) == {"module", "reason"}
    assert all(set(f) >= {"check", "severity", "key", "message"} for f in data["findings"])


def test_human_report_renders_every_section(checkpoints, capsys):
    code, out, _err = builders.run_cli(capsys, "load", str(checkpoints["llama_tied"]), "--quantize", "nf4")
    assert code == 0
    for text in (
        "Stages",
        "meta_init",
        "checkpoint_dispatch",
        "Tied keys",
        "lm_head.weight",
        "Converted modules",
        "Linear → Linear4bit",
        "Skipped modules",
        "output head",
        "OK",
    ):
        assert text in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    """Every key of each example survives validation with its value (nothing ignored or coerced away)."""
    from qfinal.config import read_yaml

    config = build_config(path)
    assert config.model_dump(by_alias=True, exclude_unset=True) == read_yaml(path)


@pytest.mark.parametrize(
    "name,method",
    [("nf4.yaml", "nf4"), ("fp4-double-quant.yaml", "fp4+double_quant"), ("int8.yaml", "int8"), ("fp16.yaml", "none")],
)
def test_example_configs_load(checkpoints, name, method):
    config = Path(__file__).parent.parent / "configs" / name
    report = qfinal.load(checkpoints["llama_tied"], config).report
    assert report.ok and report.quantization == method


def test_offload_config_spreads_over_cpu_and_disk_and_keeps_ties(checkpoints, tmp_path):
    config = Path(__file__).parent.parent / "configs" / "offload.yaml"
    result = qfinal.load(checkpoints["llama_tied"], config, offload_folder=str(tmp_path / "offload"))
    assert set(result.report.placement.values()) == {"cpu", "disk"}
    assert result.report.ok
    assert all(t.shared for t in result.report.keys.tied)


def test_yaml_errors_name_file_and_field(tmp_path, checkpoints, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantize:\n  method: nf4\n  double_qaunt: true\ndtype: 16\n")
    code, _out, err = builders.run_cli(capsys, "load", str(checkpoints["llama_tied"]), "--config", str(bad))
    assert code == 2
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert str(bad) in line and "quantize.double_qaunt: unknown key" in line and "dtype:" in line


def test_cli_flags_override_yaml(tmp_path, checkpoints):
    config = tmp_path / "c.yaml"
    config.write_text("quantize:\n  method: nf4\ndtype: float32\n")
    cfg = build_config(config, quantize="int8", dtype="bfloat16")
    assert cfg.quantize.method == "int8" and cfg.dtype == "bfloat16"


def test_run_config_with_overrides_keeps_its_other_fields():
    """qfinal.load(src, RunConfig, **overrides): an override sets its field, the rest stays."""
    from qfinal.config import resolve_config

    base = build_config(
        None, quantize="fp4", double_quant=True, compute_dtype="bfloat16", validate={"allow_missing": ["x.*"]}
    )
    cfg = resolve_config(base, {"dtype": "float16", "quantize": "nf4"})
    assert cfg.dtype == "float16" and cfg.quantize.method == "nf4"
    assert cfg.quantize.double_quant and cfg.quantize.compute_dtype == "bfloat16"
    assert cfg.validate_.allow_missing == ["x.*"]
    assert resolve_config(base, {}) is base
    assert base.quantize.method == "fp4"  # the given config is not changed


def test_config_without_architectures_needs_a_task(checkpoints, tmp_path):
    path = tmp_path / "noarch"
    shutil.copytree(checkpoints["llama_tied"], path)
    data = json.loads((path / "config.json").read_text())
    del data["architectures"]
    (path / "config.json").write_text(json.dumps(data))
    from qfinal.errors import SourceError

    with pytest.raises(SourceError, match="architectures"):
        qfinal.load(path)
    assert type(qfinal.load(path, task="causal-lm").model).__name__ == "LlamaForCausalLM"
    assert type(qfinal.load(path, task="base").model).__name__ == "LlamaModel"


def _fake_cache(hf_home: Path, repo: str, source: Path) -> None:
    """The hub cache layout: snapshots/<rev>/file -> ../../blobs/<hash>."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    rev = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snapshot = root / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, file in enumerate(sorted(source.iterdir())):
        blob = root / "blobs" / f"blob{i}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)


def test_hub_id_resolved_from_local_cache(checkpoints, tmp_path, monkeypatch, capsys):
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    _fake_cache(hf_home, "acme/tiny-llama", checkpoints["llama_tied"])
    result = qfinal.load("acme/tiny-llama")
    assert result.report.ok and result.report.source == "acme/tiny-llama"

    code, _out, err = builders.run_cli(capsys, "load", "acme/not-cached")
    assert code == 2 and "not in the local Hugging Face cache" in err


def test_demo_runs_end_to_end(capsys):
    code, out, _err = builders.run_cli(capsys, "load", "demo")
    assert code == 0
    assert "lm_head.weight" in out and "OK" in out
    code, out, _err = builders.run_cli(capsys, "load", "demo", "--json", "-")
    data = json.loads(out)
    assert data["source"] == "demo" and data["keys"]["tied"][0]["shared"] is True
    from qfinal.checkpoint.demo import ensure_demo_checkpoint

    files = sorted(p.name for p in ensure_demo_checkpoint().iterdir())
    assert files.count("model.safetensors.index.json") == 1
    assert len([f for f in files if f.startswith("model-")]) == 2


def test_demo_checkpoint_is_deterministic_and_leaves_the_global_rng_alone(tmp_path):
    from qfinal.checkpoint.demo import write_demo_checkpoint

    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    first = write_demo_checkpoint(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_next)
    second = write_demo_checkpoint(tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("width", [80, 130])
def test_stage_details_and_findings_read_whole_at_80_columns(checkpoints, width):
    """In a CI log (80 columns) a detail column would be squeezed to a word or two a line, between
    table borders; narrow, every stage detail and finding message reads as one run of text."""
    import io
    import re

    from rich.console import Console

    from qfinal.render.rich_report import render
    from qfinal.report import Finding

    report = qfinal.load(checkpoints["llama_tied"], quantize="nf4").report
    report.findings.append(
        Finding(
            check="tie_audit",
            severity="warning",
            key="lm_head.weight",
            message="a long message that explains what went wrong and what to do about it",
        )
    )
    buffer = io.StringIO()
    render(report, Console(file=buffer, width=width, force_terminal=False, color_system=None))
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    flat = re.sub(r"\s+", " ", text)
    for stage in report.stages:
        assert re.sub(r"\s+", " ", stage.detail) in flat, stage.detail
    assert "a long message that explains what went wrong and what to do about it" in flat


def test_every_extra_key_qfinal_writes_is_declared():
    """Report.extra is a declared TypedDict: an undeclared key would silently vanish from the JSON."""
    import ast

    from qfinal.report import ReportExtra

    used = set()
    for path in (Path(__file__).resolve().parents[1] / "qfinal").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "extra"
                and isinstance(node.slice, ast.Constant)
            ):
                used.add(node.slice.value)
    assert len(used) >= 10
    assert used - set(ReportExtra.__annotations__) == set()
    from qfinal.report import Report

    report = Report(source="x")
    report.extra["save"] = {"out": "o"}
    report.extra["not_declared"] = 1
    assert report.to_json_dict()["extra"] == {"save": {"out": "o"}}  # why declaring matters
