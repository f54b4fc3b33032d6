"""`qfinal validate`: broken variants of a clean checkpoint, each caught by the right named check.

Every variant is a copy of a clean fixture with one defect. Each case runs through the CLI
(`qfinal.cli.app.main`, the error boundary) in the modes that can see the defect, and asserts the
exit code, the failing check's name and the key it names. Fast mode cannot see data (NaN, equal
tie halves); those cases assert what it does say.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

MODES = ["full", "fast"]


# ----------------------------------------------------------------------------- helpers


def validate_json(capsys, path, mode: str = "full", *extra) -> tuple[int, dict]:
    """Run `qfinal validate [--fast] PATH --json -`; return (exit code, report)."""
    return builders.run_json(capsys, "validate", path, *extra, *(["--fast"] if mode == "fast" else []))


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qfinal: ")


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit, file: str = "model.safetensors") -> Path:
    tensors = load_file(folder / file)
    edit(tensors)
    save_file(tensors, folder / file, metadata={"format": "pt"})
    return folder


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


REMOVED = "model.layers.0.mlp.up_proj.weight"
EXTRA = "model.layers.0.mlp.extra_proj.weight"
RESHAPED = "model.layers.1.post_attention_layernorm.weight"
POISONED = "model.layers.0.self_attn.q_proj.weight"


def _add_extra(t):
    t[EXTRA] = torch.zeros(4, 4)


def _nan(t):
    t[POISONED] = t[POISONED].clone()
    t[POISONED][0, 0] = float("nan")
    t[POISONED][1, 1] = float("inf")


def _own_head(t):
    torch.manual_seed(7)
    t["lm_head.weight"] = torch.randn_like(t["model.embed_tokens.weight"])


def _equal_head(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()


def _reshape(t):
    t[RESHAPED] = torch.ones(32)


@pytest.fixture(scope="module")
def variants(checkpoints, tmp_path_factory):
    """Broken copies of the clean tied llama (one file) and the clean sharded llama (five shards)."""
    root = tmp_path_factory.mktemp("variants")
    clean, sharded = checkpoints["llama_tied"], checkpoints["llama_sharded"]
    out: dict[str, Path] = {"clean": clean, "clean_sharded": sharded}

    def single(name, edit):
        out[name] = edit_tensors(copy_of(clean, root / name), edit)

    single("removed", lambda t: t.pop(REMOVED))
    single("extra", _add_extra)
    single("wrong_shape", _reshape)
    single("nan", _nan)
    single("broken_tie", _own_head)
    single("equal_tie", _equal_head)
    single("multi", lambda t: (t.pop(REMOVED), _add_extra(t)))
    # Saved from the base model: no `model.` prefix. transformers adds it while loading; so must fast mode.
    single("no_prefix", lambda t: [t.__setitem__(k.removeprefix("model."), t.pop(k)) for k in list(t)])

    out["dtype"] = copy_of(clean, root / "dtype")
    edit_json(out["dtype"] / "config.json", lambda c: c.update(dtype="bfloat16"))
    out["legacy_dtype"] = copy_of(clean, root / "legacy_dtype")
    edit_json(out["legacy_dtype"] / "config.json", lambda c: (c.pop("dtype"), c.update(torch_dtype="float16")))

    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    out["shard_gone"] = copy_of(sharded, root / "shard_gone")
    (out["shard_gone"] / shards[1]).unlink()
    out["shard_gone_keys"] = sorted(k for k, s in index.items() if s == shards[1])

    # The index sends one key to a shard that does not hold it.
    moved = next(k for k, s in sorted(index.items()) if s == shards[0])
    out["wrong_shard"] = copy_of(sharded, root / "wrong_shard")
    edit_json(
        out["wrong_shard"] / "model.safetensors.index.json", lambda d: d["weight_map"].__setitem__(moved, shards[2])
    )
    out["wrong_shard_key"] = moved
    # A shard holds a key the index does not list.
    out["unlisted"] = copy_of(sharded, root / "unlisted")
    edit_tensors(out["unlisted"], lambda t: t.__setitem__("model.stray.weight", torch.zeros(2)), shards[0])
    return out


# ----------------------------------------------------------------------------- clean


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["clean", "clean_sharded", "no_prefix"])
def test_clean_checkpoint_passes(capsys, variants, name, mode):
    code, report = validate_json(capsys, variants[name], mode)
    assert code == 0, builders.failing_checks(report)
    assert report["ok"] and not builders.failing_checks(report, "warning")
    assert "tie_audit" in report["checks"] and "missing_keys" in report["checks"]
    if mode == "fast":
        assert set(report["extra"]["skipped_checks"]) == {"nan_inf", "meta_tensors"}
        assert [s["name"] for s in report["stages"]] == ["meta_init", "quantizer_preprocess", "validate"]
    else:
        assert {"nan_inf", "meta_tensors"} <= set(report["checks"])


def test_human_output_on_clean_checkpoint(capsys, variants):
    code, out, err = builders.run_cli(capsys, "validate", variants["clean"])
    assert code == 0
    assert "OK" in out and "0 error(s)" in out


# ----------------------------------------------------------------------------- one defect each


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "variant, check, key",
    [
        ("removed", "missing_keys", REMOVED),
        ("extra", "unexpected_keys", EXTRA),
        ("wrong_shape", "shape_mismatch", RESHAPED),
        ("dtype", "dtype_consistency", "config.json:dtype"),
        ("legacy_dtype", "dtype_consistency", "config.json:torch_dtype"),
    ],
)
def test_defect_is_caught_by_its_check(capsys, variants, variant, check, key, mode):
    code, report = validate_json(capsys, variants[variant], mode)
    assert code == 1
    bad = builders.failing_checks(report)
    assert list(bad) == [check], bad
    assert [f["key"] for f in bad[check]] == [key]
    if check == "shape_mismatch":
        assert report["keys"]["mismatched"] == [{"key": RESHAPED, "checkpoint_shape": [32], "model_shape": [64]}]
    if check == "dtype_consistency":
        assert "float32" in bad[check][0]["message"]


def test_nan_is_caught_in_full_mode_only(capsys, variants):
    code, report = validate_json(capsys, variants["nan"], "full")
    assert code == 1
    bad = builders.failing_checks(report)
    assert list(bad) == ["nan_inf"]
    assert bad["nan_inf"][0]["key"] == POISONED
    assert "1 NaN and 1 Inf" in bad["nan_inf"][0]["message"]
    # Fast mode never reads data: it cannot see the NaN, and says so.
    code, report = validate_json(capsys, variants["nan"], "fast")
    assert code == 0
    assert "nan_inf" not in report["checks"]
    assert "never reads tensor data" in report["extra"]["skipped_checks"]["nan_inf"]


@pytest.mark.parametrize("mode", MODES)
def test_missing_shard(capsys, variants, mode):
    code, report = validate_json(capsys, variants["shard_gone"], mode)
    assert code == 1
    bad = builders.failing_checks(report)
    assert list(bad) == ["index_consistency"], bad
    assert "missing from the folder" in bad["index_consistency"][0]["message"]
    # The shard's keys are not reported a second time as missing errors: they are listed as info.
    infos = {f["key"] for f in report["findings"] if f["check"] == "missing_keys"}
    assert infos == set(variants["shard_gone_keys"])
    if mode == "full":
        assert "not possible" in report["extra"]["full_mode"]


@pytest.mark.parametrize("mode", MODES)
def test_index_points_at_wrong_shard(capsys, variants, mode):
    code, report = validate_json(capsys, variants["wrong_shard"], mode)
    assert code == 1
    bad = builders.failing_checks(report)
    assert list(bad) == ["index_consistency"], bad
    assert [f["key"] for f in bad["index_consistency"]] == [variants["wrong_shard_key"]]
    assert "does not hold it" in bad["index_consistency"][0]["message"]
    if mode == "full":  # every shard was read: the model still loads, so data checks ran too
        assert "full_mode" not in report["extra"] and "nan_inf" in report["checks"]


@pytest.mark.parametrize("mode", MODES)
def test_shard_key_missing_from_index(capsys, variants, mode):
    code, report = validate_json(capsys, variants["unlisted"], mode)
    assert code == 1
    bad = builders.failing_checks(report)
    assert "index_consistency" in bad
    assert [f["key"] for f in bad["index_consistency"]] == ["model.stray.weight"]
    assert "not listed" in bad["index_consistency"][0]["message"]


def test_broken_tie_full_mode(capsys, variants):
    code, report = validate_json(capsys, variants["broken_tie"], "full")
    assert code == 1
    bad = builders.failing_checks(report)
    assert list(bad) == ["tie_audit"], bad
    (finding,) = bad["tie_audit"]
    assert finding["key"] == "lm_head.weight"
    for fact in ("config asks to tie", "both keys", "different data", "do not share storage"):
        assert fact in finding["message"]


def test_broken_tie_fast_mode_warns(capsys, variants):
    """Fast mode cannot compare data: both halves present is a warning (exit 0), --fail-on warning fails."""
    code, report = validate_json(capsys, variants["broken_tie"], "fast")
    assert code == 0
    warnings = builders.failing_checks(report, "warning")
    assert list(warnings) == ["tie_audit"]
    assert "cannot compare" in warnings["tie_audit"][0]["message"]
    code, report = validate_json(capsys, variants["broken_tie"], "fast", "--fail-on", "warning")
    assert code == 1


def test_equal_tie_halves_pass_full_mode(capsys, variants):
    code, report = validate_json(capsys, variants["equal_tie"], "full")
    assert code == 0, builders.failing_checks(report)
    (tie,) = [f for f in report["findings"] if f["check"] == "tie_audit"]
    assert "both keys, equal" in tie["message"] and "share storage" in tie["message"]


def test_untied_config_tie_audit_is_informative(capsys, checkpoints):
    code, report = validate_json(capsys, checkpoints["llama_untied"], "full")
    assert code == 0
    (tie,) = [f for f in report["findings"] if f["check"] == "tie_audit"]
    assert tie["severity"] == "info" and "does not ask to tie" in tie["message"]


def test_untied_loading_leaves_meta_tensor_with_reason(capsys, variants, tmp_path):
    config = write_yaml(tmp_path / "q.yaml", "tie_weights: false\n")
    code, report = validate_json(capsys, variants["clean"], "full", "--config", config)
    assert code == 1
    bad = builders.failing_checks(report)
    assert set(bad) == {"missing_keys", "tie_audit", "meta_tensors"}
    (meta,) = bad["meta_tensors"]
    assert meta["key"] == "lm_head.weight"
    assert "a tie that did not resolve" in meta["message"]


# ----------------------------------------------------------------------------- quantization


NAN_ABSMAX = "model.layers.0.mlp.up_proj.weight.absmax"


def _nan_absmax(t):
    t[NAN_ABSMAX] = t[NAN_ABSMAX].clone()
    t[NAN_ABSMAX][3] = float("nan")


@pytest.fixture(scope="module")
def nf4_variants(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4_variants")
    clean = checkpoints.quantized("llama_tied", "nf4")
    out = {"clean": clean}
    out["no_absmax"] = edit_tensors(
        copy_of(clean, root / "no_absmax"), lambda t: t.pop("model.layers.1.mlp.down_proj.weight.absmax")
    )
    out["stray_state"] = edit_tensors(
        copy_of(clean, root / "stray_state"), lambda t: t.__setitem__("lm_head.weight.absmax", torch.ones(4))
    )
    out["nan_absmax"] = edit_tensors(copy_of(clean, root / "nan_absmax"), _nan_absmax)
    out["no_qc"] = copy_of(clean, root / "no_qc")
    edit_json(out["no_qc"] / "config.json", lambda c: c.pop("quantization_config"))
    out["says_fp4"] = copy_of(clean, root / "says_fp4")
    edit_json(out["says_fp4"] / "config.json", lambda c: c["quantization_config"].update(bnb_4bit_quant_type="fp4"))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_quantized_checkpoint_passes(capsys, nf4_variants, mode):
    code, report = validate_json(capsys, nf4_variants["clean"], mode)
    assert code == 0, builders.failing_checks(report)
    (q,) = [f for f in report["findings"] if f["check"] == "quantization_config"]
    assert "14 quantized module(s) complete" in q["message"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "variant, key, text",
    [
        ("no_absmax", "model.layers.1.mlp.down_proj.weight", "lacks its quant state"),
        ("stray_state", "lm_head.weight.absmax", "belong to no quantized module"),
        ("says_fp4", "config.json:quantization_config", "hold nf4 quant state"),
    ],
)
def test_quant_state_disagreeing_with_config(capsys, nf4_variants, variant, key, text, mode):
    code, report = validate_json(capsys, nf4_variants[variant], mode)
    assert code == 1
    bad = builders.failing_checks(report)
    assert list(bad) == ["quantization_config"], bad
    assert [f["key"] for f in bad["quantization_config"]] == [key]
    assert text in bad["quantization_config"][0]["message"]
    if mode == "full":
        # qfinal refuses to load such a checkpoint (transformers' loader crashes on it): the gate
        # runs the header checks instead and says why
        assert "not possible: quantization_config" in report["extra"]["full_mode"]


@pytest.mark.parametrize(
    "variant, text",
    [
        ("no_absmax", "model.layers.1.mlp.down_proj lacks its quant state"),
        ("stray_state", "belong to no quantized module"),
        ("says_fp4", "hold nf4 quant state"),
    ],
)
def test_load_refuses_quant_state_disagreeing_with_config(capsys, nf4_variants, variant, text, monkeypatch):
    """One line and exit 2 from the headers, before any tensor is read (not exit 70 from the loader)."""
    import qfinal.compat.transformers as hf

    def no_read(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(hf, "load_checkpoint_into", no_read)
    code, _out, err = builders.run_cli(capsys, "load", nf4_variants[variant])
    assert_one_line_error(code, err)
    assert "config.json" in err and "cannot be loaded" in err and text in err


def test_nan_in_quant_state_is_caught(capsys, nf4_variants):
    code, report = validate_json(capsys, nf4_variants["nan_absmax"], "full")
    assert code == 1
    assert [f["key"] for f in builders.failing_checks(report)["nan_inf"]] == [NAN_ABSMAX]


def test_quant_state_without_quantization_config(capsys, nf4_variants):
    code, report = validate_json(capsys, nf4_variants["no_qc"], "fast")
    assert code == 1
    bad = builders.failing_checks(report)
    assert "no quantization_config" in bad["quantization_config"][0]["message"]


# ----------------------------------------------------------------------------- allow-lists and levels


@pytest.mark.parametrize("mode", MODES)
def test_allow_lists_turn_errors_into_info(capsys, variants, tmp_path, mode):
    config = write_yaml(
        tmp_path / "allow.yaml",
        "validate:\n"
        "  allow_missing: ['model.layers.*.mlp.up_proj.weight']\n"
        "  allow_unexpected: ['re:\\.extra_proj\\.']\n",
    )
    code, report = validate_json(capsys, variants["multi"], mode, "--config", config)
    assert code == 0, builders.failing_checks(report)
    by_key = {f["key"]: f for f in report["findings"] if f["check"] in ("missing_keys", "unexpected_keys")}
    assert by_key[REMOVED]["severity"] == "info" and "allow_missing" in by_key[REMOVED]["message"]
    assert by_key[EXTRA]["severity"] == "info" and "allow_unexpected" in by_key[EXTRA]["message"]


def test_allow_list_does_not_cover_other_keys(capsys, variants, tmp_path):
    config = write_yaml(tmp_path / "allow.yaml", "validate:\n  allow_missing: ['lm_head.*']\n")
    code, report = validate_json(capsys, variants["removed"], "fast", "--config", config)
    assert code == 1
    assert [f["key"] for f in builders.failing_checks(report)["missing_keys"]] == [REMOVED]


def test_fail_on_from_config_file(capsys, variants, tmp_path):
    config = write_yaml(tmp_path / "warn.yaml", "validate:\n  fail_on: warning\n")
    code, _ = validate_json(capsys, variants["broken_tie"], "fast", "--config", config)
    assert code == 1
    code, _ = validate_json(capsys, variants["broken_tie"], "fast", "--config", config, "--fail-on", "error")
    assert code == 0


def test_validate_ignores_switches_that_would_skip_the_gate(capsys, variants, tmp_path):
    config = write_yaml(tmp_path / "off.yaml", "stop_after: meta_init\nvalidate:\n  enabled: false\n")
    code, report = validate_json(capsys, variants["removed"], "full", "--config", config)
    assert code == 1 and list(builders.failing_checks(report)) == ["missing_keys"]
    assert report["extra"]["ignored_by_validate"] == ["stop_after: meta_init", "validate.enabled: false"]


# ----------------------------------------------------------------------------- JUnit


def _junit(path: Path):
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return root, suite


@pytest.mark.parametrize("mode", MODES)
def test_junit_one_testcase_per_check_and_one_failure_per_failed_check(capsys, variants, tmp_path, mode):
    junit, report_path = tmp_path / "out.xml", tmp_path / "out.json"
    args = ["validate", variants["multi"], "--junit", junit, "--json", report_path, "--quiet"]
    code, out, err = builders.run_cli(capsys, *args, *(["--fast"] if mode == "fast" else []))
    assert code == 1 and out == ""
    report = json.loads(report_path.read_text())
    root, suite = _junit(junit)
    cases = suite.findall("testcase")
    names = [c.get("name") for c in cases]
    assert len(names) == len(set(names))
    ran = [c.get("name") for c in cases if c.find("skipped") is None]
    assert ran == report["checks"]
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"missing_keys", "unexpected_keys"} == set(builders.failing_checks(report))
    assert suite.get("failures") == root.get("failures") == "2"
    assert int(suite.get("tests")) == len(cases)
    assert REMOVED in failed["missing_keys"].text and REMOVED in failed["missing_keys"].get("message")
    assert EXTRA in failed["unexpected_keys"].text
    assert failed["missing_keys"].get("type") == "missing_keys"
    skipped = {c.get("name") for c in cases if c.find("skipped") is not None}
    assert skipped == ({"nan_inf", "meta_tensors"} if mode == "fast" else set())
    assert suite.get("skipped") == str(len(skipped))


def test_junit_clean_has_no_failures_and_warning_level_counts_warnings(capsys, variants, tmp_path):
    junit = tmp_path / "clean.xml"
    code, _, _ = builders.run_cli(capsys, "validate", variants["clean"], "--junit", junit, "-q")
    assert code == 0
    _, suite = _junit(junit)
    assert suite.get("failures") == "0" and suite.findall("testcase/failure") == []
    assert suite.find("testcase[@name='tie_audit']/system-out") is not None  # info lands in system-out
    code, _, _ = builders.run_cli(
        capsys, "validate", variants["broken_tie"], "--fast", "--junit", junit, "-q", "--fail-on", "warning"
    )
    assert code == 1
    _, suite = _junit(junit)
    assert [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None] == ["tie_audit"]


def test_junit_escapes_untrusted_key_names():
    from qfinal.render.junit import to_junit
    from qfinal.report import Finding, Report

    report = Report(source="x", command="validate", checks=["missing_keys"])
    report.findings.append(
        Finding(check="missing_keys", severity="error", key='a\x00b<&>"\U0001f600', message="bad \x1b[31m key")
    )
    root = ET.fromstring(to_junit(report))
    failure = root.find("testsuite/testcase/failure")
    assert "\\x00" in failure.text and "<&>" in failure.text and "\U0001f600" in failure.text


# ----------------------------------------------------------------------------- exit 2 and checkpoint defects


def test_checkpoint_level_defects_are_exit_1(capsys, variants, tmp_path):
    """Issue 7: a broken header is a failed named check (exit 1), in both modes."""
    broken = copy_of(variants["clean"], tmp_path / "bad_header")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    for mode in MODES:
        code, report = validate_json(capsys, broken, mode)
        assert code == 1
        assert list(builders.failing_checks(report)) == ["safetensors_header"]
        assert "missing_keys" not in report["checks"]  # nothing to compare with: skipped, not passed
        assert "missing_keys" in report["extra"]["skipped_checks"]


def test_usage_errors_are_exit_2_on_one_line(capsys, variants, tmp_path):
    bad_yaml = write_yaml(tmp_path / "bad.yaml", "validate: [unclosed\n")
    unknown_key = write_yaml(tmp_path / "unknown.yaml", "validate:\n  allow_mising: []\n")
    bad_regex = write_yaml(tmp_path / "regex.yaml", "validate:\n  allow_missing: ['re:(']\n")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases = [
        ["validate", tmp_path / "does-not-exist"],
        ["validate", variants["clean"], "--config", tmp_path / "missing.yaml"],
        ["validate", variants["clean"], "--config", bad_yaml],
        ["validate", variants["clean"], "--config", unknown_key],
        ["validate", variants["clean"], "--config", bad_regex, "--fast"],
        ["validate", variants["clean"], "--fail-on", "info"],
        ["validate", no_config, "--fast"],
    ]
    for args in cases:
        code, out, err = builders.run_cli(capsys, *args)
        assert_one_line_error(code, err)
        assert out == "", args


@pytest.mark.parametrize("args", [["--no-such-flag"], []], ids=["unknown-option", "no-source"])
def test_argument_errors_are_exit_2_on_one_line(capsys, variants, args):
    code, out, err = builders.run_cli(capsys, "validate", *([variants["clean"]] if args else []), *args)
    assert_one_line_error(code, err)


def test_fast_mode_never_reads_tensor_data(capsys, variants, monkeypatch):
    """Any attempt to open tensor data fails the test: fast mode reads headers and the index only."""
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("fast mode opened tensor data")

    import transformers.modeling_utils as modeling_utils

    import qfinal.pipeline.stages.validate

    for target, name in (
        (safetensors, "safe_open"),
        (safetensors.torch, "safe_open"),
        (safetensors.torch, "load_file"),
        (modeling_utils, "safe_open"),
        (modeling_utils, "load_state_dict"),
        (torch, "load"),
        (qfinal.pipeline.stages.validate, "checkpoint_reader"),
    ):
        monkeypatch.setattr(target, name, refuse, raising=False)
    code, report = validate_json(capsys, variants["clean_sharded"], "fast")
    assert code == 0, report


def test_library_api_matches_cli(variants):
    import qfinal

    report = qfinal.validate(variants["removed"], fast=True)
    assert not report.ok
    assert [f.key for f in report.check_status("missing_keys")] == [REMOVED]
    assert report.keys.missing == [REMOVED]


# ----------------------------------------------------------------------------- pickle weights


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


@pytest.fixture(scope="module")
def pickles(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("pickles")
    good, evil = root / "good", root / "evil"
    for folder in (good, evil):
        folder.mkdir()
        shutil.copy(checkpoints["llama_tied"] / "config.json", folder / "config.json")
    torch.save(load_file(checkpoints["llama_tied"] / "model.safetensors"), good / "pytorch_model.bin")
    torch.save({"x": _Evil()}, evil / "pytorch_model.bin")
    return {"good": good, "evil": evil}


def test_pickle_weights(capsys, pickles):
    # Refused without --allow-pickle: a failed named check, exit 1 (issue 7), in both modes.
    for mode in MODES:
        code, report = validate_json(capsys, pickles["good"], mode)
        assert code == 1 and list(builders.failing_checks(report)) == ["pickle_refused"]
    code, report = validate_json(capsys, pickles["good"], "full", "--allow-pickle")
    assert code == 0, builders.failing_checks(report)
    assert "dtype_consistency" in report["extra"]["skipped_checks"]
    # Fast mode cannot read pickle keys without unpickling: it says so instead of passing them.
    code, report = validate_json(capsys, pickles["good"], "fast", "--allow-pickle")
    assert code == 0 and list(builders.failing_checks(report, "warning")) == ["checkpoint_files"]
    assert "missing_keys" not in report["checks"]


def test_pickle_that_weights_only_refuses_is_a_failed_check(capsys, pickles):
    code, out, err = builders.run_cli(capsys, "validate", pickles["evil"], "--allow-pickle", "--json", "-")
    assert code == 1, err
    assert "pickle code ran" not in out + err
    report = json.loads(out)
    assert list(builders.failing_checks(report)) == ["pickle_refused"]
    (refusal,) = builders.failing_checks(report)["pickle_refused"]
    assert "pytorch_model.bin" in refusal["message"] and "print" in refusal["message"]


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_adapter_on_top_keeps_the_audit_right(capsys, variants, tmp_path, merge):
    """Unmerged, the model is a PeftModel (prefixed names): ties, NaN and meta checks must still see it."""
    peft = pytest.importorskip("peft")
    import transformers as tf

    base = tf.LlamaForCausalLM.from_pretrained(variants["clean"])
    peft.get_peft_model(
        base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    ).save_pretrained(tmp_path / "lora")
    config = write_yaml(
        tmp_path / "a.yaml", f"adapters:\n  - path: {tmp_path / 'lora'}\n    merge: {str(merge).lower()}\n"
    )
    code, report = validate_json(capsys, variants["clean"], "full", "--config", config)
    assert code == 0, builders.failing_checks(report)
    assert "adapter_coverage" in report["checks"]
    (tie,) = [f for f in report["findings"] if f["check"] == "tie_audit"]
    assert "share storage" in tie["message"]
    code, report = validate_json(capsys, variants["clean"], "fast", "--config", config)
    assert code == 0 and "adapter_coverage" in report["extra"]["skipped_checks"]


def test_meta_tensors_name_each_reason():
    """Every reason meta_tensors gives, on a hand-built module: a key missing from the checkpoint,
    a non-persistent buffer never materialized, a tie that did not resolve, and anything else."""
    from qfinal.checks.ties import DeclaredTie, meta_findings

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loaded = torch.nn.Linear(2, 2)
            self.missing = torch.nn.Linear(2, 2, device="meta")
            self.head = torch.nn.Linear(2, 2, bias=False, device="meta")
            self.other = torch.nn.Linear(2, 2, bias=False, device="meta")
            self.register_buffer("freqs", torch.empty(4, device="meta"), persistent=False)
            self.register_buffer("kept", torch.zeros(4), persistent=False)

    block = Block()
    ties = [DeclaredTie(target="head.weight", source="loaded.weight", requested=True)]
    found = {f.key: f for f in meta_findings(block, {"missing.weight", "missing.bias"}, ties)}
    assert set(found) == {"missing.weight", "missing.bias", "head.weight", "other.weight", "freqs"}
    assert all(f.check == "meta_tensors" and f.severity == "error" for f in found.values())
    assert (
        found["missing.weight"].message == "parameter left on the meta device: the key is missing from the checkpoint"
    )
    assert (
        found["freqs"].message == "buffer left on the meta device: a non-persistent buffer that was never materialized"
    )
    assert "a tie that did not resolve (tied to loaded.weight)" in found["head.weight"].message
    assert "never loaded or initialized" in found["other.weight"].message
