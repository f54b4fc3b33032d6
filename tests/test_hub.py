"""Hub ids against a local hub emulator (tests/hub_emulator.py): what is downloaded, pinned, checked.

huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once, at import: the `hub` fixture patches
`huggingface_hub.constants.HF_HUB_OFFLINE` and sets HF_ENDPOINT, which qfinal reads at call time.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import builders
import pytest
import torch
from hub_emulator import TOKEN, HubEmulator

import qfinal

REPO = "acme/tiny-llama"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubEmulator() as emulator:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", emulator.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield emulator


def _publish(hub: HubEmulator, checkpoint: Path, tmp_path: Path, repo: str = REPO, **kwargs) -> str:
    """The checkpoint plus files a real repository carries that finalization does not need."""
    folder = tmp_path / ("repo-" + repo.replace("/", "-") + "-" + checkpoint.name)
    shutil.copytree(checkpoint, folder, dirs_exist_ok=True)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    (folder / "README.md").write_text("# tiny\n")
    (folder / "onnx").mkdir(exist_ok=True)
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 4096)
    return hub.add(repo, folder, **kwargs)


def _snapshot(tmp_path: Path, commit: str, repo: str = REPO) -> Path:
    return tmp_path / "hub-cache" / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def _weights(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


def _header_bytes(folder: Path) -> int:
    return sum(8 + struct.unpack("<Q", (folder / n).open("rb").read(8))[0] for n in _weights(folder))


def test_load_downloads_only_what_it_needs_finalizes_and_reports_the_commit(hub, checkpoints, tmp_path, capsys):
    source = checkpoints["llama_sharded"]
    assert len(_weights(source)) > 2
    commit = _publish(hub, source, tmp_path)

    code, report = builders.run_json(capsys, "load", REPO)
    assert code == 0 and report["ok"] and report["commit"] == commit
    fetched = set(report["extra"]["hub"]["downloaded"])
    wanted = {"config.json", "model.safetensors.index.json", *_weights(source)}
    wanted |= {"generation_config.json"} if (source / "generation_config.json").exists() else set()
    assert fetched == wanted  # no tokenizer, no remote code, no README, no onnx
    assert set(hub.body_bytes) == wanted
    snapshot = _snapshot(tmp_path, commit)
    for name in wanted:
        assert (snapshot / name).read_bytes() == (source / name).read_bytes()

    from_hub = qfinal.load(REPO).model.state_dict()
    local = qfinal.load(source).model.state_dict()
    assert from_hub.keys() == local.keys()
    assert all(builders.bits_equal(from_hub[k], local[k]) for k in local)

    # The second run reads the cache: the commit is resolved again (one JSON call), no file body is sent.
    hub.reset_counts()
    code, again = builders.run_json(capsys, "load", REPO)
    assert code == 0 and again["commit"] == commit and again["extra"]["hub"]["downloaded"] == []
    assert hub.weight_bytes() == 0 and not [p for m, p in hub.requests if "/resolve/" in p]

    # Pinned to the commit hash and cached: no request at all.
    hub.reset_counts()
    code, pinned = builders.run_json(capsys, "load", REPO, "--revision", commit)
    assert code == 0 and pinned["commit"] == commit and hub.requests == []


def test_revision_pins_a_commit_and_a_branch_is_resolved(hub, checkpoints, tmp_path, capsys):
    first = _publish(hub, checkpoints["llama_tied"], tmp_path)
    second = _publish(hub, checkpoints["llama_untied"], tmp_path)
    assert first != second

    code, report = builders.run_json(capsys, "load", REPO, "--stop-after", "meta_init")
    assert code == 0 and report["commit"] == second  # main is the latest commit
    code, report = builders.run_json(capsys, "load", f"{REPO}@{first}", "--stop-after", "meta_init")
    assert code == 0 and report["commit"] == first
    assert (_snapshot(tmp_path, first) / "model.safetensors").read_bytes() == (
        checkpoints["llama_tied"] / "model.safetensors"
    ).read_bytes()

    code, _out, err = builders.run_cli(capsys, "load", REPO, "--revision", "f" * 40)
    assert code == 2 and "revision not found" in err and len(err.strip().splitlines()) == 1
    code, _out, err = builders.run_cli(capsys, "load", f"{REPO}@main", "--revision", first)
    assert code == 2 and "two revisions" in err
    code, _out, err = builders.run_cli(capsys, "load", str(checkpoints["llama_tied"]), "--revision", first)
    assert code == 2 and "hub id only" in err


def test_pickle_only_repository_is_refused_before_a_weight_byte(hub, checkpoints, tmp_path, capsys):
    folder = tmp_path / "pickle-only"
    folder.mkdir()
    shutil.copy(checkpoints["llama_tied"] / "config.json", folder)
    state = qfinal.load(checkpoints["llama_tied"]).model.state_dict()
    torch.save({k: v.clone() for k, v in state.items()}, folder / "pytorch_model.bin")
    hub.add("acme/pickled", folder)

    code, _out, err = builders.run_cli(capsys, "load", "acme/pickled")
    assert code == 2 and "pickle" in err and "--allow-pickle" in err
    assert hub.weight_bytes() == 0
    assert not [p for _m, p in hub.requests if p.endswith("pytorch_model.bin")]


@pytest.mark.parametrize("damage", ["truncated", "wrong-hash"])
def test_a_damaged_shard_is_refused_and_never_used(hub, checkpoints, tmp_path, capsys, damage):
    source = checkpoints["llama_sharded"]
    commit = _publish(hub, source, tmp_path)
    shard = _weights(source)[1]
    data = (source / shard).read_bytes()
    bad = data[:-64] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 0xFF])
    hub.repos[REPO].tamper[shard] = bad

    code, _out, err = builders.run_cli(capsys, "load", REPO)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert shard in err and ("truncated" in err if damage == "truncated" else "sha256" in err)
    assert not (_snapshot(tmp_path, commit) / shard).exists()  # nothing of it stays in the cache
    blobs = _snapshot(tmp_path, commit).parent.parent / "blobs"
    assert not any(p.read_bytes() == bad for p in blobs.iterdir() if p.is_file())

    del hub.repos[REPO].tamper[shard]  # the mirror is repaired: the next run completes
    code, report = builders.run_json(capsys, "load", REPO, "--stop-after", "meta_init")
    assert code == 0 and shard in report["extra"]["hub"]["downloaded"]
    assert (_snapshot(tmp_path, commit) / shard).read_bytes() == data


def test_gated_and_unknown_repositories_are_one_line_exit_2(hub, checkpoints, tmp_path, capsys, monkeypatch):
    commit = _publish(hub, checkpoints["llama_tied"], tmp_path, repo="acme/gated", gated=True)
    code, _out, err = builders.run_cli(capsys, "plan", "acme/gated")
    assert code == 2 and "gated" in err and "HF_TOKEN" in err and len(err.strip().splitlines()) == 1
    code, _out, err = builders.run_cli(capsys, "validate", "acme/nothing-here")
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    assert hub.weight_bytes() == 0

    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")  # 403
    code, _out, err = builders.run_cli(capsys, "load", "acme/gated")
    assert code == 2 and "gated" in err and len(err.strip().splitlines()) == 1
    assert hub.weight_bytes() == 0

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, report = builders.run_json(capsys, "plan", "acme/gated")
    assert code == 0 and report["commit"] == commit


def test_offline_never_reaches_the_hub(hub, checkpoints, tmp_path, capsys, monkeypatch):
    commit = _publish(hub, checkpoints["llama_tied"], tmp_path)
    code, _out, err = builders.run_cli(capsys, "load", REPO, "--offline")
    assert code == 2 and "not in the local Hugging Face cache" in err and "--offline" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = builders.run_cli(capsys, "plan", REPO)
    assert code == 2 and "not in the local Hugging Face cache" in err
    assert hub.requests == []

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    code, _report = builders.run_json(capsys, "load", REPO, "--stop-after", "meta_init")
    assert code == 0
    hub.reset_counts()
    code, report = builders.run_json(capsys, "load", REPO, "--offline")
    assert code == 0 and report["commit"] == commit and hub.requests == []


def test_plan_and_validate_fast_read_only_json_and_headers(hub, checkpoints, tmp_path, capsys):
    source = checkpoints["llama_sharded"]
    commit = _publish(hub, source, tmp_path)
    headers = _header_bytes(source)
    weights = sum((source / n).stat().st_size for n in _weights(source))

    code, plan = builders.run_json(capsys, "plan", REPO, "--quantize", "nf4")
    assert code == 0 and plan["commit"] == commit and plan["extra"]["hub"]["headers_only"]
    assert hub.weight_bytes() == headers < weights // 10
    assert set(hub.body_bytes) - set(_weights(source)) == {
        n for n in hub.body_bytes if n.endswith(".json")
    }  # the rest is JSON
    assert _weights(_snapshot(tmp_path, commit)) == []  # no weights in the cache
    _code, local_plan = builders.run_json(capsys, "plan", str(source), "--quantize", "nf4")
    assert plan["extra"]["plan"] == local_plan["extra"]["plan"]
    assert plan["keys"] == local_plan["keys"]

    hub.reset_counts()
    code, fast = builders.run_json(capsys, "validate", REPO, "--fast")
    assert code == 0 and fast["commit"] == commit and hub.weight_bytes() == headers
    _code, local_fast = builders.run_json(capsys, "validate", str(source), "--fast")
    assert fast["findings"] == local_fast["findings"] and fast["checks"] == local_fast["checks"]
    assert fast["keys"] == local_fast["keys"]


def test_validate_fast_on_a_hub_id_reports_a_bad_header(hub, checkpoints, tmp_path, capsys):
    """The header bytes the hub serves go through qfinal's own header checks."""
    folder = tmp_path / "bad-header"
    shutil.copytree(checkpoints["llama_sharded"], folder)
    shard = _weights(folder)[0]
    raw = (folder / shard).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "Q9"
    text = json.dumps(header).encode().ljust(n)
    (folder / shard).write_bytes(raw[:8] + text[:n] + raw[8 + n :])
    hub.add("acme/bad-header", folder)

    code, report = builders.run_json(capsys, "validate", "acme/bad-header", "--fast")
    assert code == 1
    assert any(shard in (f["key"] or "") + f["message"] for f in report["findings"] if f["severity"] == "error")


def test_save_from_the_hub_fetches_tokenizer_files_but_never_remote_code(hub, checkpoints, tmp_path, capsys):
    _publish(hub, checkpoints["llama_tied"], tmp_path)
    out = tmp_path / "saved"
    code, report = builders.run_json(capsys, "save", REPO, str(out))
    assert code == 0, report["findings"]
    assert "tokenizer.json" in report["extra"]["hub"]["downloaded"]
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not [p for _m, p in hub.requests if p.endswith((".py", "README.md", ".onnx"))]


def test_trust_remote_code_is_what_fetches_custom_code(hub, checkpoints, tmp_path, capsys, monkeypatch):
    """The repository's own config class (config.json's auto_map) is fetched, and imported by the
    header-only `plan`, only with trust_remote_code."""
    import sys

    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers appends the modules folder
    folder = tmp_path / "custom-code"
    shutil.copytree(checkpoints["llama_tied"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomLlamaConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomLlamaConfig(LlamaConfig):\n    pass\n"
    )
    commit = _publish(hub, folder, tmp_path)
    trusting = tmp_path / "trust.yaml"
    trusting.write_text("trust_remote_code: true\n")
    code, report = builders.run_json(capsys, "plan", REPO)
    assert code == 0 and report["extra"]["hub"]["downloaded"]
    assert not [n for n in report["extra"]["hub"]["downloaded"] if n.endswith(".py")]
    assert not (_snapshot(tmp_path, commit) / "configuration_custom.py").exists()
    code, report = builders.run_json(capsys, "plan", REPO, "--config", str(trusting))
    assert code == 0 and report["extra"]["hub"]["headers_only"]
    assert {"configuration_custom.py", "modeling_custom.py"} <= set(report["extra"]["hub"]["downloaded"])


def test_an_adapter_repository_without_weights_is_named(hub, checkpoints, tmp_path):
    from qfinal.checkpoint.hub import HubRequest, fetch
    from qfinal.errors import SourceError

    folder = tmp_path / "config-only-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    hub.add("acme/no-weights", folder)
    for allow_pickle in (False, True):
        with pytest.raises(SourceError, match="no adapter_model.safetensors or adapter_model.bin"):
            fetch("acme/no-weights", HubRequest(adapter=True, allow_pickle=allow_pickle))


def test_a_cached_index_without_its_shards_is_not_a_snapshot(checkpoints, tmp_path):
    """What an interrupted download leaves (the index, not every shard) is not used offline."""
    from qfinal.checkpoint.hub import PICKLE_INDEX, SAFE_INDEX, holds_weights

    for index, shard in ((SAFE_INDEX, "model-00001-of-00001.safetensors"), (PICKLE_INDEX, "pytorch_model-1.bin")):
        folder = tmp_path / index
        folder.mkdir()
        shutil.copy(checkpoints["llama_tied"] / "config.json", folder)
        (folder / index).write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        assert not holds_weights(folder), index
        (folder / shard).write_bytes(b"")
        assert holds_weights(folder), index


def test_adapter_given_as_a_hub_id(hub, checkpoints, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = checkpoints["llama_tied"]
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "lora")
    hub.add("acme/tiny-lora", tmp_path / "lora")

    from_hub = qfinal.load(base, adapters=[{"path": "acme/tiny-lora", "merge": True}])
    local = qfinal.load(base, adapters=[{"path": str(tmp_path / "lora"), "merge": True}])
    assert from_hub.report.ok and from_hub.report.adapters[0].name == "tiny-lora"
    assert {n for n in hub.body_bytes} == {"adapter_config.json", "adapter_model.safetensors"}
    a, b = from_hub.model.state_dict(), local.model.state_dict()
    assert all(builders.bits_equal(a[k], b[k]) for k in b)


def test_an_unreachable_hub_falls_back_to_the_cache(hub, checkpoints, tmp_path, capsys, monkeypatch):
    commit = _publish(hub, checkpoints["llama_tied"], tmp_path)
    code, _report = builders.run_json(capsys, "plan", REPO)  # JSON and headers only: nothing to fall back on
    assert code == 0
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    code, _out, err = builders.run_cli(capsys, "plan", REPO)
    assert code == 2 and "cannot be reached" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    code, _report = builders.run_json(capsys, "load", REPO, "--stop-after", "meta_init")
    assert code == 0
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, report = builders.run_json(capsys, "load", REPO, "--stop-after", "meta_init")
    assert code == 0 and report["commit"] == commit


def test_validate_requires_the_commit_it_is_given_and_says_it_in_junit(hub, checkpoints, tmp_path, capsys):
    first = _publish(hub, checkpoints["llama_tied"], tmp_path)
    _publish(hub, checkpoints["llama_untied"], tmp_path)
    junit = tmp_path / "junit.xml"
    code, report = builders.run_json(capsys, "validate", REPO, "--fast", "--revision", first, "--junit", str(junit))
    assert code == 0 and report["commit"] == first
    assert f'name="commit" value="{first}"' in junit.read_text()
    code, _out, err = builders.run_cli(capsys, "validate", REPO, "--fast", "--revision", "0" * 40)
    assert code == 2 and "revision not found" in err


def test_a_dropped_connection_is_retried_and_the_file_checked(hub, checkpoints, tmp_path, capsys):
    """huggingface_hub retries a dropped download itself (resuming by range request past its first
    10 MB chunk; this file is smaller, so it starts over); what arrives is still checked."""
    source = checkpoints["llama_tied"]
    commit = _publish(hub, source, tmp_path)
    size = (source / "model.safetensors").stat().st_size
    hub.repos[REPO].drop_after["model.safetensors"] = size // 2

    code, report = builders.run_json(capsys, "load", REPO, "--stop-after", "meta_init")
    assert code == 0 and report["commit"] == commit
    gets = [p for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert len(gets) == 2 and hub.body_bytes["model.safetensors"] == size + size // 2
    local = (source / "model.safetensors").read_bytes()
    assert (_snapshot(tmp_path, commit) / "model.safetensors").read_bytes() == local
