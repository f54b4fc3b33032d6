"""qfinal.checkpoint.inventory and .headers: the checkpoint layout/header reader the loader and `qfinal validate` trust.

Malformed files are written by hand (8-byte little-endian length + JSON + data) so every case is
exactly the defect named; `safetensors` itself is the reference for what a valid file is.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import builders  # noqa: E402

from qfinal.checkpoint.headers import TensorEntry, escape_key, read_safetensors_header  # noqa: E402
from qfinal.checkpoint.inventory import CheckpointInventory, Problem, inspect_checkpoint, resolve_inside  # noqa: E402
from qfinal.checkpoint.pickles import is_pickle_file, safe_torch_load  # noqa: E402
from qfinal.errors import CheckpointError, SourceError  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROPS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


# ----------------------------------------------------------------------------- helpers


def st_bytes(header: dict | None, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file by hand: `length` overrides the header length field."""
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def f32(*shape: int, start: int = 0) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [start, start + n]}


VALID = {"a": f32(2), "b": f32(2, 3, start=8), "__metadata__": {"format": "pt"}}
VALID_DATA = bytes(range(32))


def write(path: Path, blob: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def safetensors_accepts(path: Path) -> list[str] | None:
    """Keys if the safetensors library opens the file, else None."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - any refusal counts as "not accepted"
        return None


def checks(inv: CheckpointInventory) -> list[str]:
    return [p.check for p in inv.problems]


def save_index(folder: Path, weight_map: dict, metadata: dict | None = None) -> None:
    doc = {"metadata": metadata if metadata is not None else {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))


def two_shards(folder: Path) -> Path:
    """A hand-made sharded folder: a.w in shard 1, b.w in shard 2, with a matching index."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a.w": torch.ones(2)}, str(folder / "s1.safetensors"))
    save_file({"b.w": torch.zeros(3)}, str(folder / "s2.safetensors"))
    save_index(folder, {"a.w": "s1.safetensors", "b.w": "s2.safetensors"})
    return folder


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return builders.llama(tmp_path_factory.mktemp("single") / "m", tied=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return builders.llama(tmp_path_factory.mktemp("sharded") / "m", tied=True, shard="100KB")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


def _reference(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


# ----------------------------------------------------------------------------- clean checkpoints


def test_clean_single_matches_safetensors(single):
    """The inventory must list exactly what safetensors sees, or the loader checks the wrong thing."""
    inv = inspect_checkpoint(single)
    assert inv.problems == []
    assert inv.format == "safetensors" and inv.index is None and inv.sharded_metadata is None
    assert inv.files == [(single / "model.safetensors").resolve()]
    ref = _reference(inv.files)
    assert {k: (e.dtype, e.shape) for k, e in inv.tensors.items()} == ref
    assert all(e.file == "model.safetensors" for e in inv.tensors.values())
    inv.raise_for_problems()  # no problems: no error


def test_clean_sharded_matches_safetensors_and_transformers(sharded):
    """sharded_metadata must equal what transformers builds, so the loader can hand it over as is."""
    from transformers.utils.hub import get_checkpoint_shard_files

    inv = inspect_checkpoint(sharded)
    assert inv.problems == []
    files, metadata = get_checkpoint_shard_files(str(sharded), str(sharded / "model.safetensors.index.json"))
    assert len(files) > 1
    assert inv.files == [Path(f).resolve() for f in files]
    assert inv.sharded_metadata == metadata
    assert inv.index == json.loads((sharded / "model.safetensors.index.json").read_text())
    ref = _reference(inv.files)
    assert {k: (e.dtype, e.shape) for k, e in inv.tensors.items()} == ref
    assert {k: e.file for k, e in inv.tensors.items()} == metadata["weight_map"]


def test_header_entries_have_offsets(tmp_path):
    """Offsets are data-section relative and metadata is returned as written."""
    path = write(tmp_path / "x.safetensors", st_bytes(VALID, VALID_DATA))
    tensors, meta = read_safetensors_header(path, root=tmp_path)
    assert meta == {"format": "pt"}
    assert tensors["a"] == TensorEntry("a", "F32", (2,), 0, 8, "x.safetensors")
    assert tensors["b"] == TensorEntry("b", "F32", (2, 3), 8, 32, "x.safetensors")
    assert safetensors_accepts(path) == ["a", "b"]


@pytest.mark.parametrize(
    "dtype,shape,nbytes",
    [
        ("BF16", [3], 6),
        ("F8_E4M3", [5], 5),
        ("F8_E5M2", [1], 1),
        ("BOOL", [2], 2),
        ("I64", [1], 8),
        ("F4", [4], 2),
        ("F6_E2M3", [4], 3),
        ("C64", [1], 8),
        ("U16", [0, 7], 0),
        ("F32", [], 4),
    ],
)
def test_dtypes_safetensors_accepts(tmp_path, dtype, shape, nbytes):
    """Every dtype code safetensors 0.8 accepts (incl. packed sub-byte and scalars) is accepted."""
    path = write(
        tmp_path / "x.safetensors",
        st_bytes({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * nbytes),
    )
    tensors, _ = read_safetensors_header(path)
    assert tensors["t"].dtype == dtype and tensors["t"].shape == tuple(shape)
    assert safetensors_accepts(path) == ["t"]


# ----------------------------------------------------------------------------- malformed headers

DUP = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'

MALFORMED = {
    # name: (file bytes, fragment expected in the message, does safetensors also refuse it?)
    "empty": (b"", "empty", True),
    "short": (b"\x05\x00\x00", "shorter than", True),
    "header_truncated": (st_bytes(VALID, VALID_DATA)[:30], "header truncated", True),
    "data_truncated": (st_bytes(VALID, VALID_DATA)[:-5], "past the end of the data section", True),
    "trailing_bytes": (st_bytes(VALID, VALID_DATA + b"xyz"), "trailing bytes", True),
    "header_len_2_63": (st_bytes(VALID, VALID_DATA, length=2**63), "limit", True),
    "header_len_gt_file": (st_bytes(VALID, VALID_DATA, length=10_000), "runs past the end", True),
    "overlap": (st_bytes({"a": f32(2), "b": f32(2, start=4)}, b"\0" * 12), "overlap", True),
    "out_of_range": (st_bytes({"a": f32(2), "b": f32(2, start=8)}, b"\0" * 8), "past the end", True),
    "gap": (st_bytes({"a": f32(2), "b": f32(2, start=12)}, b"\0" * 20), "gap", True),
    "shape_mismatch": (
        st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 12 bytes",
        True,
    ),
    "dtype_mismatch": (
        st_bytes({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 4 bytes",
        True,
    ),
    "f4_odd": (
        st_bytes({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0" * 2),
        "needs 1.5 bytes",
        True,
    ),
    "non_utf8": (
        st_bytes(None, b"\0" * 8, raw=b'{"\xff\xfe":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
        "UTF-8",
        True,
    ),
    "not_json": (st_bytes(None, b"", raw=b"{not json"), "not valid JSON", True),
    "not_object": (st_bytes(None, b"", raw=b"[1, 2]"), "JSON object", True),
    "duplicate": (st_bytes(None, b"\0" * 8, raw=DUP), "duplicate name 'a'", False),
    "unknown_dtype": (
        st_bytes({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "unknown dtype 'F33'",
        True,
    ),
    "negative_shape": (
        st_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "shape",
        True,
    ),
    "float_shape": (
        st_bytes(None, b"\0" * 8, raw=b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}'),
        "shape",
        True,
    ),
    "bool_offsets": (
        st_bytes(None, b"\0", raw=b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[false,true]}}'),
        "data_offsets",
        True,
    ),
    "negative_offsets": (
        st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}, b"\0"),
        "data_offsets",
        True,
    ),
    "three_offsets": (
        st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0"),
        "data_offsets",
        True,
    ),
    "reversed_offsets": (
        st_bytes({"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}}, b"\0"),
        "end before",
        True,
    ),
    "missing_field": (st_bytes({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8), "no 'shape'", True),
    "metadata_not_str": (st_bytes({"a": f32(2), "__metadata__": {"k": 1}}, b"\0" * 8), "__metadata__", True),
    "metadata_not_dict": (st_bytes({"a": f32(2), "__metadata__": [1]}, b"\0" * 8), "__metadata__", True),
    "nan": (
        st_bytes(None, b"\0" * 8, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}'),
        "NaN",
        True,
    ),
    "lone_surrogate": (
        st_bytes(None, b"\0" * 8, raw=b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
        "surrogate",
        True,
    ),
    "huge_dim": (st_bytes({"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 8]}}, b"\0" * 8), "shape", True),
    "deep_json": (st_bytes(None, b"", raw=b"[" * 100_000 + b"]" * 100_000), "JSON", True),
    "pickle_disguised": (pickle.dumps({"a": 1}, protocol=2), "pickle", True),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_raises_checkpoint_error(tmp_path, case):
    """Each defect raises CheckpointError that names the file and the defect, in one line."""
    blob, fragment, lib_refuses = MALFORMED[case]
    path = write(tmp_path / "bad.safetensors", blob)
    with pytest.raises(CheckpointError) as info:
        read_safetensors_header(path, root=tmp_path)
    message = str(info.value)
    assert message.startswith("bad.safetensors"), message
    assert fragment in message, message
    assert "\n" not in message and len(message) < 1000
    # safetensors is the reference: we refuse what it refuses; duplicates are our stricter extra.
    assert (safetensors_accepts(path) is None) == lib_refuses


@pytest.mark.parametrize("case", ["empty", "overlap", "duplicate", "unknown_dtype", "trailing_bytes"])
def test_malformed_single_file_is_a_problem_not_an_exception(tmp_path, case):
    """inspect_checkpoint collects header errors as named problems; raise_for_problems refuses."""
    write(tmp_path / "model.safetensors", MALFORMED[case][0])
    inv = inspect_checkpoint(tmp_path)
    assert [(p.check, p.file) for p in inv.problems] == [("safetensors_header", "model.safetensors")]
    assert inv.tensors == {}
    with pytest.raises(CheckpointError, match="model.safetensors"):
        inv.raise_for_problems()


def test_key_named_in_error(tmp_path):
    """Per-tensor errors name the tensor, escaped so it cannot forge output lines."""
    header = {"evil\nkey\x1b[31m": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}
    path = write(tmp_path / "x.safetensors", st_bytes(header, b"\0" * 8))
    with pytest.raises(CheckpointError) as info:
        read_safetensors_header(path)
    assert "evil\\nkey\\x1b[31m" in str(info.value) and "\n" not in str(info.value)


def test_pickle_named_safetensors_is_refused(tmp_path):
    """A torch.save file renamed to model.safetensors must not slip through as 'just corrupt'."""
    torch.save({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    inv = inspect_checkpoint(tmp_path, allow_pickle=True)
    assert checks(inv) == ["pickle_refused"]
    assert inv.problems[0].file == "model.safetensors"


def test_pickle_opcode_prefix_can_still_be_safetensors(tmp_path):
    """\\x80\\x02 + six zero bytes is the header length 640: a valid safetensors file, not a pickle."""
    header = json.dumps({"a": f32(2)}).encode()
    header += b" " * (640 - len(header))
    path = write(tmp_path / "x.safetensors", st_bytes(None, b"\0" * 8, raw=header))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert not is_pickle_file(path)
    assert list(read_safetensors_header(path)[0]) == ["a"]
    assert safetensors_accepts(path) == ["a"]


# ----------------------------------------------------------------------------- index consistency


def test_hand_sharded_is_clean(tmp_path):
    """The hand-made two-shard fixture is itself valid, so the defect tests below are meaningful."""
    inv = inspect_checkpoint(two_shards(tmp_path))
    assert inv.problems == [] and set(inv.tensors) == {"a.w", "b.w"}
    assert inv.tensors["b.w"].file == "s2.safetensors"


def test_index_names_missing_shard(tmp_path):
    two_shards(tmp_path)
    save_index(tmp_path, {"a.w": "s1.safetensors", "b.w": "s2.safetensors", "c.w": "s3.safetensors"})
    inv = inspect_checkpoint(tmp_path)
    assert [(p.check, p.file) for p in inv.problems] == [("index_consistency", "s3.safetensors")]
    assert "missing" in inv.problems[0].message


def test_key_in_two_shards(tmp_path):
    two_shards(tmp_path)
    save_file({"b.w": torch.zeros(3), "a.w": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    inv = inspect_checkpoint(tmp_path)
    problem = next(p for p in inv.problems if "two shards" in p.message)
    assert problem.check == "index_consistency" and problem.key == "a.w"
    assert "s1.safetensors" in problem.message and "s2.safetensors" in problem.message


def test_key_listed_in_two_shards_of_the_index(tmp_path):
    """A weight_map with the same key twice: json.loads would keep the last silently."""
    two_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"a.w": "s1.safetensors", "b.w": "s2.safetensors", "a.w": "s2.safetensors"}}'
    )
    inv = inspect_checkpoint(tmp_path)
    messages = [p.message for p in inv.problems if p.key == "a.w"]
    assert any("listed twice" in m for m in messages), inv.problems
    assert set(checks(inv)) == {"index_consistency"}


def test_index_key_not_in_its_shard_and_unlisted_key(tmp_path):
    two_shards(tmp_path)
    save_index(tmp_path, {"a.w": "s2.safetensors", "b.w": "s2.safetensors"})
    inv = inspect_checkpoint(tmp_path)
    by_msg = {p.message: p for p in inv.problems}
    assert any("does not hold it" in m and "s2.safetensors" in m for m in by_msg)
    assert by_msg and all(p.key == "a.w" for p in inv.problems)
    # s1 is no longer in the index, so it is not read at all: only the wrong mapping is reported.
    assert checks(inv) == ["index_consistency"]
    save_index(tmp_path, {"a.w": "s1.safetensors"})
    save_file({"a.w": torch.ones(2), "extra": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    inv = inspect_checkpoint(tmp_path)
    assert [(p.check, p.key) for p in inv.problems] == [("index_consistency", "extra")]
    assert "not listed" in inv.problems[0].message


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xff", "UTF-8"),
        (b"[]", "JSON object"),
        (b'{"metadata": {}}', "weight_map"),
        (b'{"metadata": {}, "weight_map": {"a.w": 3}}', "file name"),
        (b'{"weight_map": {"a.w": "s1.safetensors"}}', "metadata"),
        (b'{"metadata": [], "weight_map": {"a.w": "s1.safetensors"}}', "metadata"),
    ],
)
def test_unreadable_index_is_a_problem(tmp_path, raw, fragment):
    two_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(raw)
    inv = inspect_checkpoint(tmp_path)
    assert "index_consistency" in checks(inv)
    assert any(fragment in p.message for p in inv.problems), inv.problems


# ----------------------------------------------------------------------------- confinement


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid safetensors file outside the model folder: reading it would be an escape."""
    target = tmp_path / "outside" / "secret.safetensors"
    target.parent.mkdir()
    save_file({"a.w": torch.ones(2)}, str(target))
    return target


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "symlinked_dir"])
def test_index_shard_outside_folder(tmp_path, outside, kind):
    model = two_shards(tmp_path / "model")
    if kind == "absolute":
        name = str(outside)
    elif kind == "dotdot":
        name = "../outside/secret.safetensors"
    elif kind == "symlink":
        name = "link.safetensors"
        (model / name).symlink_to(outside)
    else:
        (model / "sub").symlink_to(outside.parent, target_is_directory=True)
        name = "sub/secret.safetensors"
    save_index(model, {"a.w": name, "b.w": "s2.safetensors"})
    inv = inspect_checkpoint(model)
    assert ("file_confinement", name) in [(p.check, p.file) for p in inv.problems]
    assert all(f.is_relative_to(model.resolve()) for f in inv.files)
    assert "a.w" not in inv.tensors  # never read


def test_single_file_symlink_outside(tmp_path, outside):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").symlink_to(outside)
    inv = inspect_checkpoint(model)
    assert checks(inv) == ["file_confinement"] and inv.files == [] and inv.tensors == {}


def test_symlink_inside_and_hub_cache_layout_allowed(tmp_path):
    """Hub snapshots link to ../../blobs; with confine_to=<repo cache folder> that is allowed."""
    repo = tmp_path / "models--x--y"
    blob = repo / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(blob))
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("../../blobs/abc123"))
    assert checks(inspect_checkpoint(snap)) == ["file_confinement"]
    inv = inspect_checkpoint(snap, confine_to=repo)
    assert inv.problems == [] and inv.files == [snap / "model.safetensors"]  # the name transformers sees
    assert inv.files[0].resolve() == blob.resolve()
    assert inv.tensors["w"].file == "model.safetensors"
    blob.write_bytes(MALFORMED["overlap"][0])  # errors name the file as the folder does, not the blob
    inv = inspect_checkpoint(snap, confine_to=repo)
    assert [(p.check, p.file, p.key) for p in inv.problems] == [("safetensors_header", "model.safetensors", "b")]
    assert str(inv.problems[0].message).startswith("data_offsets [4, 12] overlap tensor 'a'")


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a/..", "", "a\x00b", "..\\x", "C:x"])
def test_resolve_inside_refuses(tmp_path, name):
    with pytest.raises(CheckpointError, match="refused"):
        resolve_inside(tmp_path, name)


def test_resolve_inside_accepts_plain_names(tmp_path):
    (tmp_path / "sub").mkdir()
    assert resolve_inside(tmp_path, "sub/x.safetensors") == tmp_path.resolve() / "sub" / "x.safetensors"


# ----------------------------------------------------------------------------- pickle


def _touch(path: str) -> None:
    Path(path).write_text("pwned")


class Evil:
    """Unpickling this would create a marker file: the shape of a real code-execution payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pickle_refused_without_allow(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    inv = inspect_checkpoint(tmp_path)
    assert checks(inv) == ["pickle_refused"] and inv.files == []
    assert "--allow-pickle" in inv.problems[0].message and "weights_only=True" in inv.problems[0].message
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        inv.raise_for_problems()


def test_pickle_allowed_lists_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    inv = inspect_checkpoint(tmp_path, allow_pickle=True)
    assert inv.problems == [] and inv.format == "pickle"
    assert inv.files == [(tmp_path / "pytorch_model.bin").resolve()] and inv.tensors == {}


def test_pickle_sharded_index_is_confined(tmp_path, outside):
    torch.save({"w": torch.ones(2)}, tmp_path / "p1.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "p1.bin", "v": "../outside/secret.safetensors"}})
    )
    assert checks(inspect_checkpoint(tmp_path)) == ["pickle_refused"]
    inv = inspect_checkpoint(tmp_path, allow_pickle=True)
    assert checks(inv) == ["file_confinement"]
    assert inv.files == [(tmp_path / "p1.bin").resolve()]
    assert inv.sharded_metadata["weight_map"] == {"w": "p1.bin", "v": "../outside/secret.safetensors"}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
def test_safe_torch_load_refuses_code(tmp_path, fmt):
    """weights_only=True must stop the payload before it runs; proved by a marker that never appears."""
    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    payload = {"w": torch.ones(2), "x": Evil(marker)}
    if fmt == "raw":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(fmt == "zip"))
    assert is_pickle_file(path)
    with pytest.raises(CheckpointError, match="refused|cannot be loaded"):
        safe_torch_load(path)
    assert not marker.exists()
    # Control: the payload is real; a plain unpickle of the same object does create the marker.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_safe_torch_load_plain_state_dict(tmp_path, fmt):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=(fmt == "zip"))
    loaded = safe_torch_load(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)


def test_safe_torch_load_non_state_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        safe_torch_load(tmp_path / "x.pt")


def test_is_pickle_file_signatures(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "zip.data")
    torch.save({"w": torch.ones(1)}, tmp_path / "legacy.data", _use_new_zipfile_serialization=False)
    save_file({"w": torch.ones(1)}, str(tmp_path / "real.safetensors"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    assert is_pickle_file(tmp_path / "zip.data") and is_pickle_file(tmp_path / "legacy.data")
    assert is_pickle_file(tmp_path / "anything.ckpt")  # by extension, even if absent
    assert not is_pickle_file(tmp_path / "real.safetensors")
    assert not is_pickle_file(tmp_path / "plain.zip")


# ----------------------------------------------------------------------------- folder-level


def test_root_must_be_folder(tmp_path):
    write(tmp_path / "f", b"x")
    with pytest.raises(SourceError):
        inspect_checkpoint(tmp_path / "f")


def test_nothing_found(tmp_path):
    torch.save({"lr": 1}, tmp_path / "training_args.bin")  # Trainer's pickle: not weights
    inv = inspect_checkpoint(tmp_path)
    assert checks(inv) == ["checkpoint_files"] and "no model.safetensors" in inv.problems[0].message


def test_single_file_wins_over_index_like_transformers(tmp_path):
    """transformers loads model.safetensors before the index; the inventory must check that file."""
    two_shards(tmp_path)
    save_file({"only": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    inv = inspect_checkpoint(tmp_path)
    assert inv.index is None and list(inv.tensors) == ["only"]


def test_raise_for_problems_counts_the_rest(tmp_path):
    inv = CheckpointInventory(root=tmp_path)
    inv.problems = [
        Problem("index_consistency", "s1.safetensors", "k\n", "first"),
        Problem("safetensors_header", "s2.safetensors", None, "second"),
        Problem("safetensors_header", "s3.safetensors", None, "third"),
    ]
    with pytest.raises(CheckpointError) as info:
        inv.raise_for_problems()
    message = str(info.value)
    assert message.startswith("s1.safetensors [k\\n]: first") and "+2 more problems" in message
    assert "\n" not in message
    finding = inv.problems[0].to_finding()
    assert finding.check == "index_consistency" and finding.severity == "error"


def test_escape_key():
    assert escape_key("model.layers.0.weight") == "model.layers.0.weight"
    assert escape_key("a\nb\tc\\") == "a\\nb\\tc\\\\"
    assert escape_key("\u202eabc") == "\\u202eabc"  # bidi override
    assert escape_key("权重") == "权重"
    long = escape_key("x" * 10_000)
    assert len(long) < 300 and "+9800 chars" in long


# ----------------------------------------------------------------------------- properties


def _assert_only_checkpoint_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointError as err:
        assert "\n" not in str(err)
        return None


@PROPS
@given(blob=st.binary(max_size=300))
def test_random_bytes_never_crash(workdir, blob):
    path = write(workdir / "rand.safetensors", blob)
    _assert_only_checkpoint_error(read_safetensors_header, path)


@PROPS
@given(data=st.data())
def test_mutated_valid_file_agrees_with_safetensors(workdir, data):
    """Byte flips, truncations and insertions: we never crash, and never accept what safetensors
    refuses; where we refuse what it accepts, the only reason allowed is a duplicate name."""
    blob = bytearray(st_bytes(VALID, VALID_DATA))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert"]))
        i = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and blob:
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del blob[i:]
        else:
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    path = write(workdir / "mut.safetensors", bytes(blob))
    ours = _assert_only_checkpoint_error(read_safetensors_header, path)
    theirs = safetensors_accepts(path)
    if ours is not None:
        assert theirs is not None and sorted(theirs) == sorted(ours[0])
    elif theirs is not None:
        with pytest.raises(CheckpointError, match="duplicate"):
            read_safetensors_header(path)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["F32", "F16", "BF16", "U8", "F4", "F33", "f32"]),
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
    max_leaves=8,
)


@PROPS
@given(data=st.data())
def test_mutated_header_fields_agree_with_safetensors(workdir, data):
    """Replace or drop header fields with arbitrary JSON: same contract as the byte mutations."""
    header = json.loads(json.dumps(VALID))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(header) + ["new"]))
        fld = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "<whole>", "<drop>"]))
        small_ints = st.lists(st.integers(-2, 40), max_size=3)
        value = data.draw(st.one_of(json_values, small_ints))
        if fld == "<drop>":
            header.pop(key, None)
        elif fld == "<whole>" or not isinstance(header.get(key), dict):
            header[key] = value
        elif fld == "extra":
            header[key]["extra"] = value
        else:
            header[key][fld] = value
    path = write(workdir / "hdr.safetensors", st_bytes(header, VALID_DATA))
    ours = _assert_only_checkpoint_error(read_safetensors_header, path)
    theirs = safetensors_accepts(path)
    if ours is not None:
        assert sorted(theirs or []) == sorted(ours[0]) and theirs is not None
    elif theirs is not None:
        # Known, deliberate difference: serde also accepts an entry written as a [dtype, shape,
        # offsets] list; qfinal requires the object form every writer produces.
        assert any(isinstance(v, list) for k, v in header.items() if k != "__metadata__"), header


shard_names = st.one_of(
    st.sampled_from(
        [
            "s1.safetensors",
            "s2.safetensors",
            "missing.safetensors",
            "../outside/secret.safetensors",
            "/etc/passwd",
            "link.safetensors",
            "sub/../s1.safetensors",
            ".",
            "",
            "a\x00b",
            "s1.safetensors/x",
        ]
    ),
    st.text(max_size=12),
    st.integers(),
    st.none(),
)


@PROPS
@given(
    doc=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "metadata": json_values,
                "weight_map": st.dictionaries(
                    st.sampled_from(["a.w", "b.w", "c"]) | st.text(max_size=5), shard_names, max_size=5
                ),
            }
        ),
    ),
    raw=st.none() | st.binary(max_size=40),
)
def test_random_index_documents_never_crash(workdir, outside_for_props, doc, raw):
    model = outside_for_props
    blob = raw if raw is not None else json.dumps(doc).encode()
    (model / "model.safetensors.index.json").write_bytes(blob)
    inv = inspect_checkpoint(model)
    assert all(
        isinstance(p, Problem) and p.check in {"index_consistency", "file_confinement", "safetensors_header"}
        for p in inv.problems
    )
    assert all(f.is_relative_to(model.resolve()) for f in inv.files)
    if inv.problems:
        with pytest.raises(CheckpointError):
            inv.raise_for_problems()


@pytest.fixture(scope="module")
def outside_for_props(tmp_path_factory) -> Path:
    """Two real shards, a symlink that leaves the folder, and a file outside it."""
    base = tmp_path_factory.mktemp("props")
    target = base / "outside" / "secret.safetensors"
    target.parent.mkdir()
    save_file({"a.w": torch.ones(2)}, str(target))
    model = two_shards(base / "model")
    (model / "link.safetensors").symlink_to(target)
    return model


# ----------------------------------------------------------------------------- the 100 MB header cap


def test_header_length_over_cap_is_refused_unread(tmp_path):
    """A length field just over 100 MB, in a (sparse) file long enough to hold it, is refused on the
    length alone: the 100 MB are never read into memory (tracemalloc sees every bytes object)."""
    import tracemalloc

    from qfinal.checkpoint.headers import MAX_HEADER_SIZE

    path = tmp_path / "big.safetensors"
    n = builders.sparse_header_over_cap(path)
    assert n == MAX_HEADER_SIZE + 1
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            read_safetensors_header(path, root=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert message.startswith("big.safetensors") and f"header length {n}" in message
    assert f"{MAX_HEADER_SIZE}-byte limit" in message and "runs past" not in message
    assert peak < 5_000_000, f"{peak} bytes allocated while refusing the header"


# ----------------------------------------------------------------------------- YAML config properties

import yaml  # noqa: E402

from qfinal.config import RunConfig, build_config  # noqa: E402
from qfinal.errors import ConfigError  # noqa: E402

CONFIG_TEXTS = [p.read_text() for p in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))]
TOP_KEYS = sorted({f.alias or n for n, f in RunConfig.model_fields.items()} | set(RunConfig.model_fields))
SUB_KEYS = [
    "method",
    "double_quant",
    "compute_dtype",
    "quant_storage",
    "skip_modules",
    "int8_threshold",
    "mode",
    "attn_implementation",
    "compile",
    "enabled",
    "warmup",
    "gradient_checkpointing",
    "fail_on",
    "allow_missing",
    "allow_unexpected",
    "check_nan",
    "quality",
    "path",
    "name",
    "merge",
    "scale",
    "cpu",
    "disk",
    "0",
    "cuda:0",
    "tpu",
    "methd",
]
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        [
            "nf4",
            "fp4",
            "int8",
            "none",
            "auto",
            "float16",
            "bfloat16",
            "float32",
            "float8",
            "cpu",
            "inference",
            "training",
            "sdpa",
            "eager",
            "error",
            "warning",
            "2GiB",
            "300KB",
            "lm_head",
            "causal-lm",
            "LlamaForCausalLM",
            "./my-lora",
            "re:^cls\\.",
        ]
    ),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(SUB_KEYS), c, max_size=3)),
    max_leaves=6,
)
yaml_docs = st.dictionaries(st.sampled_from(TOP_KEYS + ["quantise", "allow_pickle"]), yaml_values, max_size=4)
YAML_BITS = [
    ":",
    ": ",
    "-",
    "- ",
    " ",
    "  ",
    "\n",
    "\t",
    "[",
    "]",
    "{",
    "}",
    ",",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!python/object:os.system ",
    "!!binary ",
    "'",
    '"',
    "#",
    "? ",
    "|",
    ">",
    "%YAML 1.1",
    "@",
    "`",
    "~",
    "---",
    "...",
    "1e400",
    "0x1F",
    "\x00",
    "\ufeff",
    "\x85",
    "\u2028",
    "\ud800",
    "é",
]


@st.composite
def mutated_yaml(draw) -> str:
    """A real config (configs/*.yaml or a dumped dict of plausible keys), edited a few times."""
    text = draw(st.sampled_from(CONFIG_TEXTS) | yaml_docs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["insert", "delete", "truncate", "dup_line", "drop_line", "indent"]))
        i = draw(st.integers(0, len(text)))
        lines = text.splitlines(keepends=True)
        j = draw(st.integers(0, max(len(lines) - 1, 0)))
        if op == "insert":
            text = text[:i] + draw(st.sampled_from(YAML_BITS) | st.text(max_size=3)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 6)) :]
        elif op == "truncate":
            text = text[:i]
        elif lines and op == "dup_line":
            text = "".join(lines[: j + 1] + lines[j:])
        elif lines and op == "drop_line":
            text = "".join(lines[:j] + lines[j + 1 :])
        elif lines:
            text = "".join(lines[:j] + [" " * draw(st.integers(1, 3)) + lines[j]] + lines[j + 1 :])
    return text


def _assert_config_or_config_error(path: Path, blob: bytes) -> RunConfig | None:
    """build_config gives a RunConfig or the one user-facing ConfigError naming the file; anything
    else (RecursionError, TypeError, a pydantic error...) escapes and fails the property."""
    path.write_bytes(blob)
    try:
        cfg = build_config(path)
    except ConfigError as err:
        assert str(path) in str(err), str(err)
        return None
    assert isinstance(cfg, RunConfig)
    # Strict schema: a document that is accepted holds only known top-level keys.
    doc = yaml.safe_load(blob.decode("utf-8")) or {}
    assert set(doc) <= set(TOP_KEYS), sorted(doc)
    return cfg


YAML_PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@YAML_PROPS
@given(text=st.text(max_size=200), raw=st.none() | st.binary(max_size=80))
def test_random_yaml_text_gives_config_or_config_error(workdir, text, raw):
    blob = raw if raw is not None else text.encode("utf-8", "surrogatepass")
    _assert_config_or_config_error(workdir / "random.yaml", blob)


@YAML_PROPS
@given(text=mutated_yaml())
def test_mutated_yaml_config_gives_config_or_config_error(workdir, text):
    _assert_config_or_config_error(workdir / "mutated.yaml", text.encode("utf-8", "surrogatepass"))


def test_shipped_configs_are_valid(workdir):
    """Control for the mutation property: unmutated, every configs/*.yaml is accepted."""
    assert len(CONFIG_TEXTS) >= 5
    for i, text in enumerate(CONFIG_TEXTS):
        assert isinstance(_assert_config_or_config_error(workdir / f"shipped{i}.yaml", text.encode()), RunConfig)


@pytest.mark.parametrize(
    "text",
    [
        "quantize: " + "[" * 5000,
        "[" * 100_000,
        "{a: " * 3000,
        "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 3000)),
    ],
    ids=["flow_lists", "top_level_lists", "flow_maps", "block_maps"],
)
def test_deeply_nested_yaml_is_a_config_error(tmp_path, text):
    """PyYAML composes recursively: deep nesting raised RecursionError (exit 70) before the fix."""
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        build_config(path)
