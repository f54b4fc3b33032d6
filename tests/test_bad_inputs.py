"""Issue 7: bad and unsafe inputs, through the CLI.

Every case runs `qfinal load`, `qfinal save` and `qfinal dequantize` in-process through
`qfinal.cli.app.main` (the real error boundary) and asserts: exit code 2, exactly one stderr line
naming the offending file or field, no traceback, and no output folder or `.OUT.qfinal-tmp-*`
left behind. `qfinal validate` is the exception: a defect of the checkpoint itself is a failed
named check (exit 1, the check's name in `--json -`), while a missing path, a bad config or bad
arguments still exit 2.

Corrupted checkpoints are clean fixtures copied into tmp_path and edited by hand, so each case
is exactly the defect it names. The low-level reader has its own tests (tests/test_safety.py);
these only prove the defects reach the user as one clear line and an exit code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

COMMANDS = ["load", "save", "dequantize"]
ALL_COMMANDS = COMMANDS + ["validate", "validate-fast"]
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- running the CLI


@dataclass
class Result:
    code: int | None
    out: str
    err: str


@pytest.fixture
def run(capsys):
    """Run `qfinal ARGV` in-process; return its exit code, stdout and stderr."""

    def _run(*argv) -> Result:
        return Result(*builders.run_cli(capsys, *argv))

    return _run


def argv_for(command: str, source, out: Path, *extra) -> list:
    if command in ("save", "dequantize"):
        return [command, source, out, *extra]
    if command == "validate":
        return [command, source, "--json", "-", *extra]
    if command == "validate-fast":
        return ["validate", source, "--fast", "--json", "-", *extra]
    return [command, source, "--quiet", *extra]


def no_temp_left(root: Path) -> list[Path]:
    return [p for p in root.rglob("*qfinal-tmp-*")]


def assert_refused(res: Result, *names: str, out: Path | None = None, root: Path | None = None) -> str:
    """Exit 2, one stderr line naming every `names`, no traceback, no OUT, no temp files."""
    assert res.code == 2, f"exit {res.code}, stderr:\n{res.err}"
    assert "Traceback" not in res.err, res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{res.err}"
    assert lines[0].startswith("qfinal: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        assert not list(out.parent.glob(f".{out.name}.qfinal-tmp-*"))
    if root is not None:
        assert not no_temp_left(root), no_temp_left(root)
    return lines[0]


def assert_check_failed(res: Result, check: str, *names: str) -> None:
    assert res.code == 1, f"exit {res.code}, stderr:\n{res.err}"
    assert "Traceback" not in res.err, res.err
    failed = builders.failing_checks(json.loads(res.out))  # `qfinal validate --json -`
    assert check in failed, f"{check} not among failed checks {sorted(failed)}"
    text = json.dumps(failed[check])
    for name in names:
        assert name in text, f"{name!r} not named in {check} findings: {text}"


def assert_outcome(command: str, res: Result, check: str, *names: str, out: Path, root: Path) -> None:
    """validate: a failed named check; other commands: refused with exit 2."""
    if command.startswith("validate"):
        assert_check_failed(res, check, *names)
        assert not no_temp_left(root)
    else:
        assert_refused(res, *names, out=out, root=root)


# ----------------------------------------------------------------------------- known bugs

KNOWN: dict = {}  # (case, command) -> reason, for a known bug marked strict xfail


def grid(cases, commands) -> list:
    """(case, command) params, each known bug marked strict xfail with its reason."""
    out = []
    for case in sorted(cases):
        for command in commands:
            reason = KNOWN.get((case, command))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(case, command, id=f"{case}-{command}", marks=marks))
    return out


# ----------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def plain(checkpoints) -> Path:
    return checkpoints["llama_untied"]


@pytest.fixture(scope="module")
def bnb(checkpoints) -> Path:
    return checkpoints.quantized("llama_untied", "nf4")


@pytest.fixture(scope="module")
def bnb_sharded(bnb, tmp_path_factory) -> Path:
    """The nf4 checkpoint split by hand into two shards + index (what dequantize reads)."""
    folder = tmp_path_factory.mktemp("bnb_sharded") / "m"
    shutil.copytree(bnb, folder)
    tensors = load_file(folder / SINGLE)
    (folder / SINGLE).unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:])):
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def source_for(command: str, plain: Path, bnb: Path) -> Path:
    """dequantize reads bnb checkpoints; the others read the plain one."""
    return bnb if command == "dequantize" else plain


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(folder, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- safetensors surgery


def split_file(path: Path) -> tuple[bytes, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n], blob[8 + n :]


def write_file(path: Path, header: bytes | dict, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensors_by_offset(header: dict) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


def m_empty(path: Path) -> None:
    path.write_bytes(b"")


def m_truncated_header(path: Path) -> None:
    raw, _data = split_file(path)
    path.write_bytes(path.read_bytes()[: 8 + len(raw) // 2])


def m_truncated_data(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def m_trailing_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 64)


def m_header_length_2_63(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**63) + path.read_bytes()[8:])


def m_header_length_past_end(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob[8:])


def m_overlapping_offsets(path: Path) -> None:
    raw, data = split_file(path)
    header = json.loads(raw)
    order = tensors_by_offset(header)
    second = header[order[1]]
    start, end = second["data_offsets"]
    second["data_offsets"] = [start - 4, end - 4]  # starts inside the first tensor
    write_file(path, header, data)


def m_offsets_out_of_range(path: Path) -> None:
    raw, data = split_file(path)
    header = json.loads(raw)
    last = header[tensors_by_offset(header)[-1]]
    start, end = last["data_offsets"]
    last["data_offsets"] = [start + 4096, end + 4096]  # past the end of the data section
    write_file(path, header, data)


def m_shape_does_not_fit(path: Path) -> None:
    raw, data = split_file(path)
    header = json.loads(raw)
    name = next(k for k in tensors_by_offset(header) if header[k]["dtype"] in ("F32", "F16", "BF16"))
    header[name]["shape"] = header[name]["shape"] + [3]  # three times the bytes its range holds
    write_file(path, header, data)


def m_non_utf8_header(path: Path) -> None:
    raw, data = split_file(path)
    assert b'"model.' in raw
    write_file(path, raw.replace(b'"model.', b'"\xff\xfeodel.', 1), data)


def m_duplicate_names(path: Path) -> None:
    """A second, empty entry under an existing tensor's name, ahead of the real one.

    The layout still tiles the data section whichever entry a reader keeps, so only a reader that
    looks for duplicate names notices that one name means two tensors.
    """
    raw, data = split_file(path)
    header = json.loads(raw)
    name = tensors_by_offset(header)[0]
    dup = json.dumps({"dtype": header[name]["dtype"], "shape": [0], "data_offsets": [0, 0]})
    text = "{" + json.dumps(name) + ": " + dup + ", " + raw.decode().strip()[1:]
    write_file(path, text.encode(), data)


HEADER_CASES = {
    "empty": m_empty,
    "truncated_header": m_truncated_header,
    "truncated_data": m_truncated_data,
    "trailing_bytes": m_trailing_bytes,
    "header_length_2_63": m_header_length_2_63,
    "header_length_past_end": m_header_length_past_end,
    "overlapping_offsets": m_overlapping_offsets,
    "offsets_out_of_range": m_offsets_out_of_range,
    "shape_does_not_fit": m_shape_does_not_fit,
    "non_utf8_header": m_non_utf8_header,
    "duplicate_names": m_duplicate_names,
}


@pytest.mark.parametrize("case,command", grid(HEADER_CASES, ALL_COMMANDS))
def test_bad_safetensors_file(run, plain, bnb, tmp_path, command, case):
    src = copy_of(source_for(command, plain, bnb), tmp_path)
    HEADER_CASES[case](src / SINGLE)
    out = tmp_path / "out"
    res = run(*argv_for(command, src, out))
    assert_outcome(command, res, "safetensors_header", SINGLE, out=out, root=tmp_path)


# ----------------------------------------------------------------------------- sharded index defects


def shard_names(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))


def rewrite_index(folder: Path, fn) -> None:
    doc = json.loads((folder / INDEX).read_text())
    doc["weight_map"] = {k: fn(v) for k, v in doc["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(doc))


def move_out(folder: Path, shard: str) -> Path:
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    target = outside / shard
    shutil.move(folder / shard, target)
    return target


def i_missing_shard(folder: Path) -> str:
    shard = shard_names(folder)[-1]
    (folder / shard).unlink()
    return shard


def i_key_in_two_shards(folder: Path) -> str:
    first, second = shard_names(folder)[:2]
    extra = load_file(folder / first)
    key = sorted(extra)[0]
    tensors = load_file(folder / second)
    tensors[key] = extra[key]
    save_file(tensors, str(folder / second), metadata={"format": "pt"})
    return second


def i_absolute_shard_path(folder: Path) -> str:
    shard = shard_names(folder)[-1]
    target = move_out(folder, shard)
    rewrite_index(folder, lambda v: str(target) if v == shard else v)
    return shard


def i_dotdot_shard_path(folder: Path) -> str:
    shard = shard_names(folder)[-1]
    move_out(folder, shard)
    rewrite_index(folder, lambda v: f"../outside/{shard}" if v == shard else v)
    return shard


def i_symlink_out_of_folder(folder: Path) -> str:
    shard = shard_names(folder)[-1]
    target = move_out(folder, shard)
    (folder / shard).symlink_to(target)
    return shard


def i_index_not_json(folder: Path) -> str:
    text = (folder / INDEX).read_text()
    (folder / INDEX).write_text(text[: len(text) // 2])
    return INDEX


def i_index_names_wrong_shard(folder: Path) -> str:
    """The index says a tensor is in the last shard; it is in the first."""
    first, last = shard_names(folder)[0], shard_names(folder)[-1]
    doc = json.loads((folder / INDEX).read_text())
    key = sorted(k for k, v in doc["weight_map"].items() if v == first)[0]
    doc["weight_map"][key] = last
    (folder / INDEX).write_text(json.dumps(doc))
    return last


INDEX_CASES = {
    "index_not_json": (i_index_not_json, "index_consistency"),
    "index_names_wrong_shard": (i_index_names_wrong_shard, "index_consistency"),
    "missing_shard": (i_missing_shard, "index_consistency"),
    "key_in_two_shards": (i_key_in_two_shards, "index_consistency"),
    "absolute_shard_path": (i_absolute_shard_path, "file_confinement"),
    "dotdot_shard_path": (i_dotdot_shard_path, "file_confinement"),
    "symlink_out_of_folder": (i_symlink_out_of_folder, "file_confinement"),
}


@pytest.mark.parametrize("case,command", grid(INDEX_CASES, ALL_COMMANDS))
def test_bad_sharded_checkpoint(run, checkpoints, bnb_sharded, tmp_path, command, case):
    mutate, check = INDEX_CASES[case]
    src = copy_of(bnb_sharded if command == "dequantize" else checkpoints["llama_sharded"], tmp_path)
    shard = mutate(src)
    out = tmp_path / "out"
    res = run(*argv_for(command, src, out))
    assert_outcome(command, res, check, shard, out=out, root=tmp_path)


# ----------------------------------------------------------------------------- the source itself


def s_missing_path(folder: Path) -> tuple[str, str]:
    shutil.rmtree(folder)
    return str(folder), str(folder)


def s_no_config_json(folder: Path) -> tuple[str, str]:
    (folder / "config.json").unlink()
    return str(folder), "config.json"


def s_config_not_json(folder: Path) -> tuple[str, str]:
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return str(folder), "config.json"


def s_config_not_an_object(folder: Path) -> tuple[str, str]:
    (folder / "config.json").write_text('["llama"]')
    return str(folder), "config.json"


def s_unknown_model_type(folder: Path) -> tuple[str, str]:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "no-such-model-type"
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder), "no-such-model-type"


def s_hub_id_not_cached(folder: Path) -> tuple[str, str]:
    return "qfinal-tests/not-in-the-cache", "qfinal-tests/not-in-the-cache"


def s_source_is_a_file(folder: Path) -> tuple[str, str]:
    return str(folder / "config.json"), "config.json"


SOURCE_CASES = {
    "missing_path": s_missing_path,
    "no_config_json": s_no_config_json,
    "config_not_json": s_config_not_json,
    "config_not_an_object": s_config_not_an_object,
    "unknown_model_type": s_unknown_model_type,
    "hub_id_not_cached": s_hub_id_not_cached,
    "source_is_a_file": s_source_is_a_file,
}


@pytest.mark.parametrize("case,command", grid(SOURCE_CASES, ALL_COMMANDS))
def test_bad_source(run, plain, bnb, tmp_path, command, case):
    """Even `validate` exits 2 here: there is no checkpoint to report on."""
    src = copy_of(source_for(command, plain, bnb), tmp_path)
    source, named = SOURCE_CASES[case](src)
    out = tmp_path / "out"
    res = run(*argv_for(command, source, out))
    assert_refused(res, named, out=out, root=tmp_path)
    assert res.out == ""


def test_hub_id_is_never_downloaded(run, plain, tmp_path):
    """The isolated HF_HOME stays empty of that repo: nothing was fetched or half-fetched."""
    res = run("load", "qfinal-tests/not-in-the-cache")
    assert_refused(res, "qfinal-tests/not-in-the-cache", "cache")
    hub = Path(os.environ["HF_HOME"]) / "hub"
    assert not list(hub.glob("*not-in-the-cache*"))


# ----------------------------------------------------------------------------- YAML config and arguments


YAML_CASES = {
    # name: (text, what the message must name besides the file)
    "syntax_error": ("quantize:\n  method: [nf4\n", "YAML"),
    "unknown_key": ("quantise:\n  method: nf4\n", "quantise"),
    "unknown_nested_key": ("quantize:\n  methd: nf4\n", "quantize.methd"),
    "wrong_type": ("quantize:\n  int8_threshold: high\n", "quantize.int8_threshold"),
    "wrong_top_level_type": ("- nf4\n", "mapping"),
    "bad_value": ("dtype: float8\n", "dtype"),
}


@pytest.mark.parametrize("command", ["load", "save", "validate"])
@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_bad_yaml_config(run, plain, tmp_path, command, case):
    text, field = YAML_CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    res = run(*argv_for(command, plain, out, "--config", config))
    assert_refused(res, str(config), field, out=out, root=tmp_path)


@pytest.mark.parametrize("command", ["load", "save", "validate"])
def test_missing_yaml_config(run, plain, tmp_path, command):
    config = tmp_path / "nope.yaml"
    out = tmp_path / "out"
    res = run(*argv_for(command, plain, out, "--config", config))
    assert_refused(res, str(config), "not found", out=out, root=tmp_path)


BAD_ARGS = [
    # (command, extra args, what the message must name)
    ("load", ["--quantize", "nf5"], "quantize"),
    ("save", ["--quantize", "nf5"], "quantize"),
    ("load", ["--dtype", "float8"], "dtype"),
    ("load", ["--double-quant"], "double_quant"),
    ("load", ["--max-memory", "lots"], "--max-memory"),
    ("load", ["--max-memory", "tpu=1GB"], "max_memory"),
    ("load", ["--offload-folder", "offload"], "offload_folder"),
    ("load", ["--stop-after", "nowhere"], "stop_after"),
    ("save", ["--max-shard-size", "lots"], "lots"),
    ("dequantize", ["--max-shard-size", "lots"], "lots"),
    ("dequantize", ["--max-shard-size", "0"], "shard size"),
    ("dequantize", ["--dtype", "int8"], "--dtype"),
    ("validate", ["--fail-on", "fatal"], "--fail-on"),
]
BAD_ARGS = [pytest.param(c, e, n, id=f"{c}-{'_'.join(e).lstrip('-')}") for c, e, n in BAD_ARGS] + [
    pytest.param(command, ["--frobnicate"], "--frobnicate", id=f"{command}-frobnicate")
    for command in ["load", "save", "dequantize", "validate"]
]


@pytest.mark.parametrize("command,extra,named", BAD_ARGS)
def test_bad_arguments(run, plain, bnb, tmp_path, command, extra, named):
    out = tmp_path / "out"
    res = run(*argv_for(command, source_for(command, plain, bnb), out, *extra))
    assert_refused(res, named, out=out, root=tmp_path)


@pytest.mark.parametrize("command", COMMANDS + ["validate"])
def test_missing_argument(run, tmp_path, command):
    res = run(command)
    assert_refused(res, "Missing argument", root=tmp_path)


def test_dequantize_into_its_own_source(run, bnb, tmp_path):
    src = copy_of(bnb, tmp_path)
    before = sorted(p.name for p in src.iterdir())
    res = run("dequantize", src, src, "--force")
    assert_refused(res, str(src), root=tmp_path)
    assert sorted(p.name for p in src.iterdir()) == before


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("command", ["load", "save"])
@pytest.mark.parametrize("case", ["no_adapter_config", "missing_folder"])
def test_bad_adapter_folder(run, plain, tmp_path, command, case):
    adapter = tmp_path / "adapter"
    if case == "no_adapter_config":
        adapter.mkdir()
        save_file(
            {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, str(adapter / "adapter_model.safetensors")
        )
    out = tmp_path / "out"
    res = run(*argv_for(command, plain, out, "--adapter", adapter))
    line = assert_refused(res, str(adapter), out=out, root=tmp_path)
    if case == "no_adapter_config":
        assert "adapter_config.json" in line


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("command", ["save", "dequantize"])
def test_existing_output_is_kept_without_force(run, plain, bnb, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    res = run(command, source_for(command, plain, bnb), out)
    assert_refused(res, str(out), "--force", root=tmp_path)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["save", "dequantize"])
def test_output_parent_is_a_file(run, plain, bnb, tmp_path, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    res = run(command, source_for(command, plain, bnb), out)
    assert_refused(res, str(blocker), root=tmp_path)
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["load", "save"])
@pytest.mark.parametrize("where", ["under_a_file", "proc"])
@pytest.mark.parametrize("disk", [False, True], ids=["no_disk_offload", "disk_offload"])
def test_offload_folder_not_writable(run, plain, tmp_path, command, where, disk):
    """We run as root, so chmod does not block writes: use paths no one can create folders in."""
    if where == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        offload = blocker / "offload"
    else:
        offload = Path("/proc/qfinal-offload-test")
    extra = ["--device-map", "auto", "--offload-folder", offload]
    if disk:
        extra += ["--max-memory", "cpu=10KB,disk=1GB"]
    out = tmp_path / "out"
    res = run(*argv_for(command, plain, out, *extra))
    assert_refused(res, str(offload), out=out, root=tmp_path)
    assert not offload.exists()


# ----------------------------------------------------------------------------- pickle checkpoints


class Payload:
    """Unpickling this creates `marker`: the shape of a real code-execution payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_checkpoint(source: Path, dest: Path, payload=None) -> Path:
    """`source` with its safetensors weights replaced by pytorch_model.bin (torch.save)."""
    shutil.copytree(source, dest)
    state = load_file(dest / SINGLE)
    (dest / SINGLE).unlink()
    if payload is not None:
        state["lm_head.extra"] = payload
    torch.save(state, dest / "pytorch_model.bin")
    return dest


def test_payload_is_real(tmp_path):
    """Control: an ordinary unpickle of the payload does create its marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({"w": torch.ones(1), "x": Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_refused_without_allow_pickle(run, plain, bnb, tmp_path, command):
    src = pickle_checkpoint(source_for(command, plain, bnb), tmp_path / "src")
    out = tmp_path / "out"
    res = run(*argv_for(command, src, out))
    if command == "dequantize":  # dequantize reads safetensors only: it names the folder or the file
        line = assert_refused(res, out=out, root=tmp_path)
        assert str(src) in line or "pytorch_model.bin" in line, line
    else:
        assert_refused(res, "pytorch_model.bin", "--allow-pickle", out=out, root=tmp_path)


def test_validate_reports_refused_pickle(run, plain, tmp_path):
    src = pickle_checkpoint(plain, tmp_path / "src")
    assert_check_failed(run("validate", src, "--json", "-"), "pickle_refused", "pytorch_model.bin")


@pytest.mark.parametrize(
    "command",
    [
        "load",
        "save",
        "dequantize",
        "validate",
    ],
)
def test_malicious_pickle_refused_with_allow_pickle(run, plain, bnb, tmp_path, command):
    marker = tmp_path / "marker"
    src = pickle_checkpoint(source_for(command, plain, bnb), tmp_path / "src", Payload(marker))
    out = tmp_path / "out"
    extra = [] if command == "dequantize" else ["--allow-pickle"]
    res = run(*argv_for(command, src, out, *extra))
    try:
        if command == "validate":  # a checkpoint defect: a failed named check, exit 1, the file named
            assert_check_failed(res, "pickle_refused", "pytorch_model.bin", "weights_only=True")
            assert "pickle_refused" in json.loads(res.out)["extra"]["full_mode"]
            assert not out.exists() and not no_temp_left(tmp_path)
        elif command == "dequantize":
            line = assert_refused(res, out=out, root=tmp_path)
            assert str(src) in line or "pytorch_model.bin" in line, line
        else:
            assert_refused(res, "pytorch_model.bin", out=out, root=tmp_path)
    finally:
        assert not marker.exists(), "the pickle payload ran"


# ----------------------------------------------------------------------------- loose pickle weights


def loose_pickle_checkpoint(source: Path, dest: Path, name: str, payload=None) -> Path:
    """`source` with its safetensors weights replaced by a torch.save'd state dict named `name`."""
    shutil.copytree(source, dest)
    state = load_file(dest / SINGLE)
    (dest / SINGLE).unlink()
    if payload is not None:
        state["lm_head.extra"] = payload
    torch.save(state, dest / name)
    return dest


LOOSE = ["model.pt", "model.pth", "model.ckpt"]


@pytest.mark.parametrize("name", LOOSE)
def test_loose_pickle_refused_without_allow_pickle(run, plain, tmp_path, name):
    src = loose_pickle_checkpoint(plain, tmp_path / "src", name)
    line = assert_refused(run("load", src, "--quiet"), name, "--allow-pickle", "weights_only=True", root=tmp_path)
    assert "pytorch_model.bin" not in line
    assert_check_failed(run("validate", src, "--json", "-"), "pickle_refused", name)


@pytest.mark.parametrize("name", LOOSE)
def test_loose_pickle_loaded_with_allow_pickle(run, plain, tmp_path, name):
    """--allow-pickle loads the loose file (weights_only=True): every key found, none left missing."""
    src = loose_pickle_checkpoint(plain, tmp_path / "src", name)
    res = run("load", src, "--allow-pickle", "--json", "-")
    assert res.code == 0 and res.err == "", res.err
    doc = json.loads(res.out)
    meta_init = next(s for s in doc["stages"] if s["name"] == "meta_init")
    assert "1 pickle file(s)" in meta_init["detail"], meta_init
    assert doc["keys"]["missing"] == [] and doc["keys"]["unexpected"] == [] and doc["ok"] is True
    assert not any(f["check"] == "pickle_refused" for f in doc["findings"])


@pytest.mark.parametrize("name", LOOSE)
def test_loose_malicious_pickle_refused_with_allow_pickle(run, plain, tmp_path, name):
    marker = tmp_path / "marker"
    src = loose_pickle_checkpoint(plain, tmp_path / "src", name, Payload(marker))
    try:
        assert_refused(run("load", src, "--quiet", "--allow-pickle"), name, "weights_only=True", root=tmp_path)
        res = run("validate", src, "--allow-pickle", "--json", "-")
        assert_check_failed(res, "pickle_refused", name)
    finally:
        assert not marker.exists(), "the pickle payload ran"


# ----------------------------------------------------------------------------- the 100 MB header cap


def test_header_over_cap_refused_by_load(run, plain, tmp_path):
    import tracemalloc

    src = copy_of(plain, tmp_path)
    n = builders.sparse_header_over_cap(src / SINGLE)
    tracemalloc.start()
    try:
        res = run("load", src, "--quiet")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_refused(res, SINGLE, f"header length {n}", "100000000-byte limit", root=tmp_path)
    assert peak < 50_000_000, f"{peak} bytes allocated: the header was read"


@pytest.mark.parametrize("command", ["validate", "validate-fast"])
def test_header_over_cap_is_a_failed_check(run, plain, tmp_path, command):
    src = copy_of(plain, tmp_path)
    builders.sparse_header_over_cap(src / SINGLE)
    res = run(*argv_for(command, src, tmp_path / "out"))
    assert_check_failed(res, "safetensors_header", SINGLE, "100000000-byte limit")


# ----------------------------------------------------------------------------- --debug


@pytest.mark.parametrize("how", ["plain", "flag", "env"])
def test_debug_shows_traceback_and_keeps_exit_2(run, tmp_path, monkeypatch, how):
    """--debug (or QFINAL_DEBUG=1) adds the traceback; the exit code and the last line stay the same."""
    missing = tmp_path / "nope"
    # setenv first so monkeypatch restores the variable: `--debug` sets it in os.environ.
    monkeypatch.setenv("QFINAL_DEBUG", "1" if how == "env" else "")
    argv = ["--debug", "load", missing] if how == "flag" else ["load", missing]
    res = run(*argv)
    if how == "plain":
        assert_refused(res, str(missing), "path does not exist", root=tmp_path)
        return
    assert res.code == 2, res.err
    assert "Traceback (most recent call last)" in res.err and "SourceError" in res.err, res.err
    last = res.err.strip().splitlines()[-1]
    assert last.startswith("qfinal: error: ") and str(missing) in last, last
    assert res.out == ""


# ----------------------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_off_by_default(run, plain):
    res = run("load", plain, "--json", "-")
    assert res.code == 0, res.err
    assert json.loads(res.out)["trust_remote_code"] is False
    res = run("load", plain)
    assert res.code == 0 and "trust_remote_code" not in res.out


def test_trust_remote_code_only_from_the_config(run, plain, tmp_path):
    config = tmp_path / "trust.yaml"
    config.write_text("trust_remote_code: true\n")
    res = run("load", plain, "--config", config, "--json", "-")
    assert res.code == 0, res.err
    assert json.loads(res.out)["trust_remote_code"] is True
    res = run("load", plain, "--config", config)
    assert res.code == 0 and "trust_remote_code=ON" in res.out, res.out
    assert_refused(run("load", plain, "--trust-remote-code"), "--trust-remote-code")  # no CLI switch


# ----------------------------------------------------------------------------- atomic report files


def _fail_fsync(monkeypatch, errno_: int) -> None:
    import qfinal.checkpoint.atomic

    def fsync(fd):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(qfinal.checkpoint.atomic.os, "fsync", fsync)


REPORT_FILES = {
    # name: (file name, argv given the source and the file)
    "junit": ("report.xml", lambda src, f: ["validate", src, "--fast", "--quiet", "--junit", f]),
    "diff_html": ("diff.html", lambda src, f: ["diff", src, src, "--no-outputs", "--quiet", "--html", f]),
    "quality_html": ("quality.html", lambda src, f: ["load", src, "--quantize", "nf4", "--quiet", "--html", f]),
}


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("kind", sorted(REPORT_FILES))
def test_report_file_is_written_atomically(run, plain, tmp_path, monkeypatch, kind, error):
    """An fsync failure while writing keeps the old file and leaves no temp file beside it; a full
    disk or an I/O error is the destination's fault: one line, exit 2."""
    import errno

    name, argv = REPORT_FILES[kind]
    target = tmp_path / name
    target.write_text("the previous report")
    res = run(*argv(plain, target))  # control: a normal run replaces the file
    assert res.code == 0, res.err
    written = target.read_text()
    assert written != "the previous report" and ("<testsuites" in written or "<html" in written.lower())
    target.write_text("the previous report")
    _fail_fsync(monkeypatch, getattr(errno, error))
    res = run(*argv(plain, target))
    assert_refused(res, str(target), "No space left" if error == "ENOSPC" else "Input/output error", root=tmp_path)
    assert target.read_text() == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == [name]
