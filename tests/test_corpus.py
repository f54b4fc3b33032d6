"""Issue 20: a seeded corpus of malformed inputs; none may end in exit 70 or write anything.

Small valid fixtures (the tiny Llama, plain and sharded; its bnb nf4 and int8 versions; a sharded
nf4 one; a LoRA adapter made with peft) are copied into tmp_path and mutated by a generator seeded
from the case id alone (`Random(f"{SEED}-{family}-{id}")`), so `pytest tests/test_corpus.py -k
'flip-017'` rebuilds exactly the failing input. Each case runs through the commands that read what
it breaks (`qfinal load / validate [--fast] / save / dequantize`, in-process through the CLI's
error boundary) and every run must:

* exit 2 with exactly one stderr line, or 1 with a report holding an error-severity finding (a
  failed check: validate's findings, load's missing keys or NaN); never 70 and no traceback;
* exit 0 only where the case says the mutation may be harmless (`may_pass`: e.g. a byte flip that
  leaves the header's tensors as they were, two equal-sized tensors swapping their bytes, or a
  command documented not to read what was broken, such as `validate --fast` and tensor data);
* write nothing: the tmp_path tree (the mutated source included) is unchanged apart from the
  `--json` report on exit 0/1 and OUT on exit 0; no OUT, no temp folder, no report on exit 2.

A case whose `known` names a gap (broken input some command still accepts) is a strict xfail: it
must reproduce, and once fixed the marking must go. Cheap cases (fail-fast validation,
milliseconds) dominate; the families that get as far as a full load or a save are smaller.
`pytest -s` prints the count and the exit codes per command.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

SEED = 20
INDEX = "model.safetensors.index.json"
PRINTABLE = '{}[]":,0123456789 -.eE_abcdfnrstuxyzABFIU\\/'
# safetensors dtype -> bits: the corpus's own table (the code under test must not judge itself)
BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}  # fmt: skip


# ----------------------------------------------------------------------------- cases and checks


@dataclass
class Case:
    """What one mutation produced: the source to read and the runs (command, extra args, may_pass)."""

    what: str
    source: Path | str
    runs: list[tuple[str, list, bool]] = field(default_factory=list)
    known: str | None = None  # a known gap: some run accepts the broken input (strict xfail)

    def on(self, commands, extra=(), may_pass=False) -> Case:
        self.runs += [(c, list(extra), may_pass) for c in commands]
        return self


class Work:
    """One case's tmp_path: fresh copies of the fixtures, the report and OUT paths."""

    def __init__(self, root: Path, fx: dict[str, Path]):
        self.root, self.fx = root, fx
        self.report = root / "report.json"
        self.out = root / "out"

    def copy(self, name: str, dest: str = "src") -> Path:
        return Path(shutil.copytree(self.fx[name], self.root / dest, symlinks=True))

    def outside(self) -> Path:
        folder = self.root / "outside"
        folder.mkdir(exist_ok=True)
        return folder


TALLY: Counter = Counter()  # (command, exit code) -> runs
CASES: set = set()


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if not TALLY:
        return
    print(f"\ncorpus: {len(CASES)} cases, {sum(TALLY.values())} runs")
    for command in sorted({c for c, _ in TALLY}):
        codes = ", ".join(f"exit {k}: {n}" for (c, k), n in sorted(TALLY.items()) if c == command)
        print(f"  {command:14} {codes}")


def argv(command: str, source, w: Work, extra: list) -> list:
    head = {
        "load": ["load", source],
        "validate": ["validate", source],
        "validate-fast": ["validate", source, "--fast"],
        "save": ["save", source, w.out],
        "dequantize": ["dequantize", source, w.out],
    }[command]
    return [*head, "--quiet", "--json", w.report, *([] if command == "dequantize" else extra)]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (symlinks not followed) with its type, size and mtime."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = (Path(folder) / name).lstat()
            seen[os.path.relpath(Path(folder) / name, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def check_run(capsys, w: Work, case_id: str, case: Case, command: str, extra: list, may_pass: bool) -> bool:
    """One run's invariants; True when it hit the case's known gap (accepted the broken input)."""
    before = snapshot(w.root)
    code, out, err = builders.run_cli(capsys, *argv(command, case.source, w, extra))
    TALLY[command, code] += 1
    label = f"{case_id} [{command}] {case.what}: exit {code}\n{err[-3000:]}"
    assert code != 70 and "Traceback" not in err, label
    assert out == "", f"{label}\n--quiet printed: {out[:500]}"
    known_hit = code == 0 and not may_pass and case.known is not None
    assert code in ((0, 1, 2) if may_pass or known_hit else (1, 2)), label
    allowed = set()
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qfinal: "), label
    else:
        report = json.loads(w.report.read_text())
        if code == 1:
            assert builders.failing_checks(report, report["extra"].get("fail_on", "error")), label
        allowed = {"report.json"} | ({"out"} if code == 0 else set())
    changed = {p for p in set(before) ^ set(snapshot(w.root)) if p.split(os.sep)[0] not in allowed}
    changed |= {p for p, v in snapshot(w.root).items() if p in before and before[p] != v and p != "report.json"}
    assert not changed, f"{label}\nwritten: {sorted(changed)[:10]}"
    shutil.rmtree(w.out, ignore_errors=True)
    w.report.unlink(missing_ok=True)
    return known_hit


def ids(kinds, n: int) -> list[str]:
    return [f"{kinds[i % len(kinds)]}-{i:03d}" for i in range(n)]


def run_family(capsys, tmp_path, fx, family: str, mutators: dict, case_id: str) -> None:
    rng = random.Random(f"{SEED}-{family}-{case_id}")
    w = Work(tmp_path, fx)
    case = mutators[case_id.rsplit("-", 1)[0]](rng, w)
    assert case.runs, case_id
    CASES.add((family, case_id))
    hits = [check_run(capsys, w, case_id, case, command, extra, may_pass) for command, extra, may_pass in case.runs]
    if case.known:  # strict: once fixed, the marking must go
        if any(hits):
            pytest.xfail(f"known gap: {case.known}")
        pytest.fail(f"{case_id}: known gap no longer reproduces, drop its marking: {case.known}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fx(checkpoints, tmp_path_factory) -> dict[str, Path]:
    plain = checkpoints["llama_untied"]
    root = tmp_path_factory.mktemp("corpus")
    return {
        "plain": plain,
        "sharded": checkpoints["llama_sharded"],
        "nf4": checkpoints.quantized("llama_untied", "nf4"),
        "int8": checkpoints.quantized("llama_untied", "int8"),
        "nf4_sharded": builders.bnb_checkpoint(plain, root / "nf4_sharded", "nf4", max_shard_size="100KB"),
    }


@pytest.fixture(scope="module")
def fx_lora(fx, tmp_path_factory) -> dict[str, Path]:
    """`fx` plus "lora": a peft LoRA adapter for the plain Llama (q_proj, v_proj)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(SEED)
    model = builders.model_class_for(fx["plain"]).from_pretrained(fx["plain"]).eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]
    )
    out = tmp_path_factory.mktemp("corpus_lora") / "lora"
    peft.get_peft_model(model, config).save_pretrained(out)
    return {**fx, "lora": out}


# ----------------------------------------------------------------------------- safetensors surgery


def split(path: Path) -> tuple[bytes, bytes]:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return blob[8 : 8 + n], blob[8 + n :]


def put(path: Path, header, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entries(raw: bytes) -> dict | None:
    """The header's tensor entries (no __metadata__), or None when it is no JSON object."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return {k: v for k, v in doc.items() if k != "__metadata__"} if isinstance(doc, dict) else None


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


COMMANDS_FOR = {
    # fixture -> the commands that read its weights (validate picks --fast or full at random)
    "plain": ["load", "validate", "save"],
    "sharded": ["load", "validate"],
    "nf4": ["dequantize", "load", "validate", "save"],
    "int8": ["dequantize", "load", "save"],
    "nf4_sharded": ["dequantize", "validate"],
}


def commands(rng, name: str) -> list[str]:
    return [
        ("validate-fast" if rng.random() < 0.5 else "validate") if c == "validate" else c for c in COMMANDS_FOR[name]
    ]


def st_target(rng, w: Work) -> tuple[Path, Path, str]:
    name = rng.choice(["plain", "plain", "nf4", "int8", "sharded", "nf4_sharded"])
    src = w.copy(name)
    return src, rng.choice(sorted(src.glob("*.safetensors"))), name


def header_case(mutate):
    """A header mutator (rng, file) -> (what, may_pass) as a case on a random fixture's file.

    `dequantize` never builds the model, so it cannot know that a plain tensor was renamed,
    reshaped or retyped: for it a well-formed header whose quant state is untouched may pass."""

    def make(rng, w: Work) -> Case:
        src, path, name = st_target(rng, w)
        before = entries(split(path)[0])
        what, may_pass, *known = mutate(rng, path)
        after = entries(split(path)[0]) if well_formed(path) else None
        case = Case(f"{name}/{path.name}: {what}", src, known=known[0] if known else None)
        for command in commands(rng, name):
            same_state = after is not None and quant_state(after) == quant_state(before)
            case.on([command], may_pass=may_pass or (command == "dequantize" and same_state))
        return case

    return make


QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB") + tuple(
    f".quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")
)


def quant_state(header: dict) -> dict:
    """The entries of quant state and of the weights it belongs to (int8: every I8 tensor)."""
    state = {k for k in header if k.endswith(QUANT_SUFFIXES)}
    owners = {k for k in header if any(s.startswith(k + ".") for s in state)}
    owners |= {k for k, v in header.items() if isinstance(v, dict) and v.get("dtype") == "I8"}
    owners |= {k[: -len(".SCB")] + ".weight" for k in state if k.endswith(".SCB")}
    return {k: header.get(k) for k in state | owners}


def _no_dups(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate name")
    return dict(pairs)


def _refuse(name):
    raise ValueError(name)


def well_formed(path: Path) -> bool:
    """The corpus's own safetensors check: length, strict JSON, dtypes, shapes and exact tiling."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 0 <= n <= len(blob) - 8:
        return False
    try:
        doc = json.loads(blob[8 : 8 + n].decode(), object_pairs_hook=_no_dups, parse_constant=_refuse)
        metadata = doc.get("__metadata__") or {}
        spans = sorted(_span(v) for k, v in doc.items() if k != "__metadata__")
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        return False
    if not (isinstance(metadata, dict) and all(isinstance(x, str) for x in metadata.values())):
        return False
    pos = 0
    for start, end in spans:
        if start != pos:
            return False
        pos = end
    return pos == len(blob) - 8 - n


def _span(entry: dict) -> tuple[int, int]:
    """An entry's data offsets once its dtype, shape and offsets agree (ValueError otherwise)."""
    (start, end), shape = entry["data_offsets"], entry["shape"]
    sizes = [start, end, *shape] if isinstance(shape, list) else [None]
    if not all(type(d) is int and d >= 0 for d in sizes) or _prod(shape) * BITS[entry["dtype"]] != 8 * (end - start):
        raise ValueError("entry does not fit")
    return start, end


def h_truncate(rng, path):
    blob = path.read_bytes()
    cut = rng.randrange(0, min(len(blob), 8 + int.from_bytes(blob[:8], "little") + 64))
    path.write_bytes(blob[:cut])
    return f"file cut at byte {cut}", False


def h_flip(rng, path):
    raw, data = split(path)
    new = bytearray(raw)
    spots = [rng.randrange(len(new)) for _ in range(rng.randint(1, 4))]
    for i in spots:
        new[i] = rng.randrange(256) if rng.random() < 0.3 else ord(rng.choice(PRINTABLE))
    put(path, bytes(new), data)
    same = entries(bytes(new)) == entries(raw)  # a flip in whitespace or __metadata__ may be harmless
    return f"header bytes {spots} changed", same


def h_dtype(rng, path):
    raw, data = split(path)
    header = json.loads(raw)
    key = rng.choice(tensor_names(header))
    old = header[key]["dtype"]
    pool = [*BITS, "F33", "f32", "", "float32", "FP32", "BOOL ", "F4", "Q4_0", 32, None, [old], {"F32": 1}, True]
    new = rng.choice([d for d in pool if d != old])
    header[key]["dtype"] = new
    put(path, header, data)
    same_size = isinstance(new, str) and BITS.get(new) == BITS[old]
    int_for_float = same_size and old[0] in "FB" and new[0] in "IU" and not key.endswith(QUANT_SUFFIXES)
    return f"{key}: dtype {old} -> {new!r}", same_size and not int_for_float, INT_FOR_FLOAT if int_for_float else None


INT_FOR_FLOAT = (
    "an integer tensor where the model has a float parameter (F32 -> I32) is loaded, cast, and "
    "saved without a finding: dtype_consistency looks at floating tensors only"
)


def h_shape(rng, path):
    raw, data = split(path)
    header = json.loads(raw)
    key = rng.choice(tensor_names(header))
    old = header[key]["shape"]
    pool = [
        old + [1],
        [1] + old,
        old[::-1],
        old + [rng.randint(2, 5)],
        old[:-1],
        [old[0] * 2] + old[1:] if old else [2],
        [-1] + old[1:],
        [1.5] + old[1:],
        [str(d) for d in old],
        [2**64] + old[1:],
        [2**63, 2],
        [2**32, 2**32] + old,
        [],
        [0],
        None,
        "x".join(map(str, old)),
        {"0": old},
        [True] * len(old),
    ]
    new = rng.choice([s for s in pool if s != old])
    header[key]["shape"] = new
    put(path, header, data)
    same_bytes = isinstance(new, list) and all(type(d) is int and d >= 0 for d in new) and _prod(new) == _prod(old)
    # a reshaped packed 4-bit weight keeps its bytes; its quant state holds the real shape
    return f"{key}: shape {old} -> {new!r}", same_bytes and header[key]["dtype"] == "U8" and len(old) == 2


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def h_offsets(rng, path):
    raw, data = split(path)
    header = json.loads(raw)
    names = tensor_names(header)
    key = rng.choice(names)
    start, end = header[key]["data_offsets"]
    d = rng.choice([-16, -4, -1, 1, 4, 16])
    pool = {
        "shift": [start + d, end + d],
        "stretch": [start, end + d],
        "reverse": [end, start],
        "negative": [-1, end],
        "huge": [start, 2**64],
        "float": [start + 0.5, end],
        "string": [str(start), end],
        "one": [start],
        "three": [start, end, end],
        "null": None,
        "empty": [0, 0],
        "past_end": [start + len(data), end + len(data)],
    }
    how = rng.choice([*pool, "swap"])
    if how == "swap":
        other = rng.choice([n for n in names if n != key])
        a, b = header[key], header[other]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
        put(path, header, data)
        swapped_fits = a["data_offsets"][1] - a["data_offsets"][0] == end - start
        return f"{key} <-> {other}: offsets swapped", swapped_fits and a["dtype"] == b["dtype"]
    header[key]["data_offsets"] = pool[how]
    put(path, header, data)
    return f"{key}: offsets {how} {pool[how]!r}", pool[how] == [start, end]


def h_names(rng, path):
    raw, data = split(path)
    header = json.loads(raw)
    key = rng.choice(tensor_names(header))
    how = rng.choice(
        ["duplicate", "not_object", "no_field", "metadata", "metadata_twice", "renamed", "not_a_dict", "json"]
    )
    if how == "duplicate":
        dup = json.dumps({key: {**header[key], "shape": [0], "data_offsets": [0, 0]}})[1:-1]
        put(path, ("{" + dup + ", " + raw.decode().strip()[1:]).encode(), data)
    elif how == "not_object":
        header[key] = rng.choice([[1, 2], 1, None, "F32", True])
    elif how == "no_field":
        del header[key][rng.choice(["dtype", "shape", "data_offsets"])]
    elif how == "metadata":
        header["__metadata__"] = rng.choice([[1], 1, "pt", {"format": 1}, {"format": None}, {"a": {"b": "c"}}])
    elif how == "metadata_twice":
        put(path, b'{"__metadata__": {"format": "pt"}, ' + raw.decode().strip()[1:].encode(), data)
    elif how == "renamed":  # valid header; the model misses `key` and gets an unexpected one
        new = rng.choice(["", " ", "\x00", "a\nb", "\u202egnp.", "../../etc/passwd", "x" * 5000, key.upper()])
        header[new] = header.pop(key)
    elif how == "not_a_dict":
        put(path, json.dumps(rng.choice([[1], "x", 1, None])).encode(), data)
    else:
        text = rng.choice(["[" * 100_000, '{"a": NaN}', '{"a": 1e999}', "1" * 5000, '{"\\ud800": 1}', "{}x"])
        put(path, text.encode(), data)
    if how not in ("duplicate", "metadata_twice", "not_a_dict", "json"):  # those wrote their own bytes
        put(path, header, data)
    return f"{key}: {how}", False


def h_length(rng, path):
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    new = rng.choice(
        [0, 1, 7, n - 1, n + 1, n + 8, len(blob) - 8, len(blob) - 7, len(blob), 2**63, 2**64 - 1, 100_000_001]
        + [rng.randrange(2**64), rng.randrange(n)]
    )
    path.write_bytes(struct.pack("<Q", new) + blob[8:])
    return f"header length {n} -> {new}", new == n


HEADER = {
    "truncate": header_case(h_truncate),
    "flip": header_case(h_flip),
    "dtype": header_case(h_dtype),
    "shape": header_case(h_shape),
    "offsets": header_case(h_offsets),
    "names": header_case(h_names),
    "length": header_case(h_length),
}


@pytest.mark.parametrize("case_id", ids(sorted(HEADER), 420))
def test_safetensors_header(capsys, tmp_path, fx, case_id):
    run_family(capsys, tmp_path, fx, "header", HEADER, case_id)


# ----------------------------------------------------------------------------- tensor data


def d_resize(rng, w: Work) -> Case:
    src, path, name = st_target(rng, w)
    raw, data = split(path)
    k = rng.randint(1, max(1, len(data) // 2))
    at = rng.randrange(len(data) + 1)
    how = rng.choice(["cut_end", "append", "insert", "delete"])
    new = {
        "cut_end": data[:-k],
        "append": data + rng.randbytes(k),
        "insert": data[:at] + rng.randbytes(k) + data[at:],
        "delete": data[:at] + data[at + k :],
    }[how]
    put(path, raw, new)
    return Case(f"{name}/{path.name}: data {how} {k} bytes", src).on(commands(rng, name))


def d_nan(rng, w: Work) -> Case:
    """NaN or Inf written into a float tensor: the bytes are well formed, the values are not."""
    name = rng.choice(["plain", "sharded"])
    src = w.copy(name)
    path = rng.choice(sorted(src.glob("*.safetensors")))
    tensors = load_file(path)
    key = rng.choice(sorted(k for k, v in tensors.items() if v.is_floating_point()))
    flat = tensors[key].view(-1)
    spots = [rng.randrange(flat.numel()) for _ in range(rng.randint(1, 8))]
    flat[spots] = rng.choice([float("nan"), float("inf"), float("-inf")])
    save_file(tensors, str(path), metadata={"format": "pt"})
    cmds = ["load", "validate"] + (["save"] if name == "plain" else [])
    return Case(f"{name}/{path.name}: {key}[{spots}] not finite", src).on(cmds)


DATA = {"resize": d_resize, "nan": d_nan}


@pytest.mark.parametrize("case_id", ids(sorted(DATA), 100))
def test_tensor_data(capsys, tmp_path, fx, case_id):
    run_family(capsys, tmp_path, fx, "data", DATA, case_id)


# ----------------------------------------------------------------------------- sharded index


def index_target(rng, w: Work) -> tuple[Path, dict, str]:
    name = rng.choice(["sharded", "sharded", "nf4_sharded"])
    src = w.copy(name)
    return src, json.loads((src / INDEX).read_text()), name


def index_case(mutate):
    """An index mutator (rng, w, folder, doc) -> what; it edits `doc` (written back) or the folder."""

    def make(rng, w: Work) -> Case:
        src, doc, name = index_target(rng, w)
        original = (src / INDEX).read_bytes()
        what = mutate(rng, w, src, doc)
        if not (src / INDEX).is_symlink() and (src / INDEX).read_bytes() == original:
            (src / INDEX).write_text(json.dumps(doc))
        return Case(f"{name}: {what}", src).on(commands(rng, name))

    return make


def shards_of(doc: dict) -> list[str]:
    return sorted(set(doc["weight_map"].values()))


def i_missing_shard(rng, w, src, doc):
    shard = rng.choice(shards_of(doc))
    (src / shard).unlink()
    return f"{shard} deleted"


def i_wrong_shard(rng, w, src, doc):
    key = rng.choice(sorted(doc["weight_map"]))
    other = rng.choice([s for s in shards_of(doc) if s != doc["weight_map"][key]])
    doc["weight_map"][key] = other
    return f"{key} mapped to {other}"


def i_two_shards(rng, w, src, doc):
    first, second = rng.sample(shards_of(doc), 2)
    extra = load_file(src / first)
    key = rng.choice(sorted(extra))
    tensors = load_file(src / second)
    tensors[key] = extra[key]
    save_file(tensors, str(src / second), metadata={"format": "pt"})
    return f"{key} also in {second}"


def i_listing(rng, w, src, doc):
    if rng.random() < 0.5:
        key = rng.choice(sorted(doc["weight_map"]))
        del doc["weight_map"][key]
        return f"{key} not listed"
    key = f"model.layers.{rng.randint(0, 9)}.extra.weight"
    doc["weight_map"][key] = rng.choice(shards_of(doc))
    return f"{key} listed, in no shard"


def i_bad_path(rng, w, src, doc):
    shard = rng.choice(shards_of(doc))
    moved = w.outside() / shard
    pool = {
        "dotdot": f"../outside/{shard}",
        "dotdot_inside": f"sub/../{shard}",
        "absolute": str(src / shard),
        "absolute_outside": str(moved),
        "backslash": f"sub\\{shard}",
        "drive": f"C:{shard}",
        "empty": "",
        "nul": f"{shard}\x00",
        "newline": f"{shard}\n",
        "long": "x" * 300 + ".safetensors",
        "deep_long": "/".join(["y" * 200] * 30),
        "home": f"~/{shard}",
        "url": f"file://{src / shard}",
        "itself": INDEX,
        "config": "config.json",
        "dot": ".",
        "dev": "/dev/zero",
        "proc": "/proc/self/environ",
    }
    how = rng.choice(sorted(pool))
    if how.startswith(("dotdot", "absolute_outside")) or how == "url":
        shutil.copy(src / shard, moved)
    doc["weight_map"] = {k: (pool[how] if v == shard else v) for k, v in doc["weight_map"].items()}
    return f"{shard} named {pool[how]!r} ({how})"


def i_symlink(rng, w, src, doc):
    shard = rng.choice(shards_of(doc))
    path = src / shard
    outside = w.outside() / shard
    shutil.move(path, outside)
    how = rng.choice(["outside", "relative_outside", "dangling", "loop", "folder", "dev_zero", "other_shard", "index"])
    target = {
        "outside": outside,
        "relative_outside": Path("..") / "outside" / shard,
        "dangling": src / "nowhere.safetensors",
        "loop": path,
        "folder": src,
        "dev_zero": Path("/dev/zero"),
        "other_shard": Path(rng.choice([s for s in shards_of(doc) if s != shard])),
        "index": Path(INDEX),
    }[how]
    if how == "index":  # the index itself is the link, out of the folder
        shutil.move(outside, path)
        shutil.move(src / INDEX, w.outside() / INDEX)
        (src / INDEX).symlink_to(w.outside() / INDEX)
        return "index is a symlink out of the folder"
    path.symlink_to(target)
    return f"{shard} -> {target} ({how})"


def i_not_json(rng, w, src, doc):
    text = json.dumps(doc)
    how = rng.choice(["cut", "empty", "binary", "null", "list", "string", "nan", "deep", "utf16", "bom", "dup", "big"])
    data = {
        "cut": text[: rng.randrange(len(text))].encode(),
        "empty": b"",
        "binary": rng.randbytes(rng.randint(1, 200)),
        "null": b"null",
        "list": b"[]",
        "string": b'"weight_map"',
        "nan": text.replace('"total_size": ', '"total_size": NaN, "x": ', 1).encode(),
        "deep": b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "utf16": text.encode("utf-16"),
        "bom": b"\xef\xbb\xbf" + text.encode(),
        "dup": text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "a.safetensors", ', 1).encode(),
        "big": text.encode(),
    }[how]
    (src / INDEX).write_bytes(data)
    if how == "big":  # padded, sparsely, past the 100 MB an index may have
        os.truncate(src / INDEX, 100_000_001)
    return f"index {how}"


def i_types(rng, w, src, doc):
    how = rng.choice(
        ["map_list", "map_str", "map_null", "map_missing", "value", "metadata", "no_metadata", "map_empty"]
    )
    if how.startswith("map_"):
        doc["weight_map"] = {"map_list": [shards_of(doc)], "map_str": "x", "map_null": None, "map_empty": {}}.get(how)
        if how == "map_missing":
            del doc["weight_map"]
    elif how == "value":
        key = rng.choice(sorted(doc["weight_map"]))
        doc["weight_map"][key] = rng.choice([1, None, [doc["weight_map"][key]], {"f": 1}, True])
    elif how == "metadata":
        doc["metadata"] = rng.choice([[1], "x", 1, True])
    else:
        del doc["metadata"]
    return f"index {how}"


INDEX_MUTATORS = {
    "missing_shard": index_case(i_missing_shard),
    "wrong_shard": index_case(i_wrong_shard),
    "two_shards": index_case(i_two_shards),
    "listing": index_case(i_listing),
    "bad_path": index_case(i_bad_path),
    "symlink": index_case(i_symlink),
    "not_json": index_case(i_not_json),
    "types": index_case(i_types),
}


@pytest.mark.parametrize("case_id", ids(sorted(INDEX_MUTATORS), 160))
def test_index(capsys, tmp_path, fx, case_id):
    run_family(capsys, tmp_path, fx, "index", INDEX_MUTATORS, case_id)


# ----------------------------------------------------------------------------- config.json


def config_case(mutate, lenient=("dequantize",), sources=("plain", "plain", "sharded", "nf4", "int8")):
    """A config mutator (rng, folder, config dict) -> what; it edits the dict (written back) or,
    clearing it, the files. `lenient` commands may pass: dequantize reads only quantization_config
    (and architectures, for Conv1D layouts), `validate --fast` never reads generation_config.json."""

    def make(rng, w: Work) -> Case:
        name = rng.choice(sources)
        src = w.copy(name)
        config = json.loads((src / "config.json").read_text())
        what = mutate(rng, src, config)
        what, passing = what if isinstance(what, tuple) else (what, lenient)
        if config:
            (src / "config.json").write_text(json.dumps(config))
        case = Case(f"{name}: {what}", src)
        for command in commands(rng, name):
            case.on([command], may_pass=command in passing)
        return case

    return make


def c_model_type(rng, src, config):
    new = rng.choice([None, 1, ["llama"], "", "no-such-model", "llama ", "LLAMA", {"llama": 1}, True, "drop"])
    if new == "drop":
        del config["model_type"]
    else:
        config["model_type"] = new
    return f"model_type {new!r}"


def c_architectures(rng, src, config):
    new = rng.choice(
        [["NoSuchForCausalLM"], [], "LlamaForCausalLM", [1], None, ["BertForMaskedLM"], ["GPT2LMHeadModel"],
         ["AutoConfig"], ["__class__"], ["PreTrainedModel"], ["os"], [""], ["Nope", "LlamaForCausalLM"],
         ["LlamaForSequenceClassification"], ["T5ForConditionalGeneration"], {"0": "LlamaForCausalLM"}]
    )  # fmt: skip
    config["architectures"] = new
    return f"architectures {new!r}"


FIELD_VALUES = {
    "hidden_size": ["64", -64, 0, 63, 128, 64.5, None, [64]],
    "intermediate_size": ["128", -1, 0, 256, None],
    "num_hidden_layers": ["2", -1, 3, 1, 2.5, None, True],
    "num_attention_heads": [0, 3, -4, "4", None, 5],
    "num_key_value_heads": [0, 3, -2, "2", 8],
    "vocab_size": [0, -1, "256", 257, 128, None],
    "max_position_embeddings": [-1, "64", None, [64]],
    "head_dim": [0, -16, "16", 32, 15],
    "rms_norm_eps": ["1e-6", None, [1e-6], {"eps": 1}],
    "hidden_act": ["nonsense", 1, None, ["silu"]],
    "tie_word_embeddings": ["yes", 2, [True]],
    "attention_bias": ["no", 1, [False], True],
    "mlp_bias": ["no", True],
    "rope_parameters": ["default", [1], {"rope_type": "nonsense"}, {"rope_type": "linear"}, {"rope_theta": "x"}],
    "dtype": ["float99", "", 5, ["float32"], "int8", "torch.float32x"],
    "pretraining_tp": ["1", [1]],
}


def c_field(rng, src, config):
    key = rng.choice(sorted(FIELD_VALUES))
    config[key] = rng.choice(FIELD_VALUES[key])
    return f"{key}: {config[key]!r}"


def c_json(rng, src, config):
    text = json.dumps(config)
    how = rng.choice(["cut", "empty", "binary", "list", "null", "deep", "utf16", "nan_field", "folder", "big_int"])
    path = src / "config.json"
    if how == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(
            {
                "cut": text[: rng.randrange(len(text))].encode(),
                "empty": b"",
                "binary": rng.randbytes(rng.randint(1, 100)),
                "list": b"[1, 2]",
                "null": b"null",
                "deep": b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                "utf16": text.encode("utf-16"),
                "nan_field": text.replace('"hidden_size": 64', '"hidden_size": NaN').encode(),
                "big_int": text.replace('"hidden_size": 64', '"hidden_size": ' + "9" * 5000).encode(),
            }[how]
        )
    config.clear()
    return f"config.json {how}"


def c_generation(rng, src, config):
    """generation_config.json: transformers reads it beside the weights; a broken one must not crash."""
    path = src / "generation_config.json"
    how = rng.choice(["cut", "binary", "list", "deep", "types", "folder"])
    text = path.read_text()
    if how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "types":
        doc = json.loads(text)
        doc[rng.choice(["max_length", "temperature", "num_beams", "eos_token_id", "do_sample"])] = rng.choice(
            ["x", -5, [None], {"a": 1}]
        )
        path.write_text(json.dumps(doc))
    else:
        path.write_bytes(
            {
                "cut": text[: rng.randrange(len(text))].encode(),
                "binary": rng.randbytes(rng.randint(1, 100)),
                "list": b"[1]",
                "deep": b"[" * 100_000 + b"]" * 100_000,
            }[how]
        )
    if how in ("types", "folder"):  # only generate() reads these values; a folder is no file, as for transformers
        return f"generation_config.json {how}", tuple(COMMANDS_FOR["plain"]) + ("validate-fast", "dequantize")
    return f"generation_config.json {how}"


CONFIG = {
    "model_type": config_case(c_model_type),
    "architectures": config_case(c_architectures),
    "field": config_case(c_field),
    "json": config_case(c_json),
    "generation": config_case(c_generation, lenient=("dequantize", "validate-fast")),  # fast reads no such file
}


@pytest.mark.parametrize("case_id", ids(sorted(CONFIG), 150))
def test_config_json(capsys, tmp_path, fx, case_id):
    run_family(capsys, tmp_path, fx, "config", CONFIG, case_id)


# ----------------------------------------------------------------------------- quantization state


def edit_tensors(src: Path, fn) -> str:
    """Apply fn(tensors) -> what to the weights file holding quant state (a shard: the index follows)."""
    files = [p for p in sorted(src.glob("*.safetensors")) if any(k.endswith(QUANT_SUFFIXES) for k in load_file(p))]
    path = files[0]
    tensors = load_file(path)
    what = fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    if (src / INDEX).exists():
        doc = json.loads((src / INDEX).read_text())
        doc["weight_map"] = {k: p.name for p in sorted(src.glob("*.safetensors")) for k in load_file(p)}
        (src / INDEX).write_text(json.dumps(doc))
    return what


def quant_case(mutate, sources=("nf4", "nf4", "int8", "int8", "nf4_sharded")):
    """A mutator (rng, folder, fixture name) -> what, or (what, commands that may pass)."""

    def make(rng, w: Work) -> Case:
        name = rng.choice(sources)
        src = w.copy(name)
        what = mutate(rng, src, name)
        what, lenient = what if isinstance(what, tuple) else (what, ())
        case = Case(f"{name}: {what}", src)
        for command in commands(rng, name):
            case.on([command], may_pass=command in lenient)
        return case

    return make


def q_drop(rng, src, name):
    def fn(tensors):
        state = sorted(k for k in tensors if k.endswith(QUANT_SUFFIXES))
        gone = rng.sample(state, rng.choice([1, 1, 2, len(state)]))
        for k in gone:
            del tensors[k]
        return f"dropped {gone[:3]}{'...' if len(gone) > 3 else ''}"

    return edit_tensors(src, fn)


def q_foreign(rng, src, name):
    """State of the other kind beside a weight: 4-bit blob on an int8 weight, SCB on a 4-bit one."""

    def fn(tensors):
        weight = rng.choice(sorted(k for k in tensors if k.endswith("proj.weight")))
        if tensors[weight].dtype == torch.int8:
            blob = b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}'
            tensors[weight + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
            tensors[weight + ".absmax"] = torch.ones(64)
            tensors[weight + ".quant_map"] = torch.linspace(-1, 1, 16)
        else:
            tensors[weight[: -len(".weight")] + ".SCB"] = torch.ones(64)
        return f"foreign quant state on {weight}"

    return edit_tensors(src, fn)


def q_reshape(rng, src, name):
    """Well-formed files whose quant state does not fit its weight."""

    def fn(tensors):
        key = rng.choice(sorted(k for k in tensors if k.endswith(QUANT_SUFFIXES) or tensors[k].dtype == torch.int8))
        t = tensors[key]
        how = rng.choice(["shorter", "longer", "transposed", "flat", "empty", "retyped"])
        if how == "shorter" and t.dim() and t.shape[0] > 1:
            tensors[key] = t[: t.shape[0] // 2].clone()
        elif how == "longer" and t.dim():
            tensors[key] = torch.cat([t, t])
        elif how == "transposed" and t.dim() == 2:
            tensors[key] = t.t().contiguous()
        elif how == "flat" and t.dim() == 2:
            tensors[key] = t.reshape(-1).clone()
        elif how == "empty":
            tensors[key] = t.new_zeros((0,))
        else:
            how = "retyped"
            target = rng.choice([torch.float16, torch.bfloat16, torch.int32, torch.float64, torch.uint8, torch.int8])
            target = torch.float16 if target == t.dtype else target
            tensors[key] = t.to(target)
        return f"{key} {how}"

    return edit_tensors(src, fn)


def q_blob(rng, src, name):
    """The 4-bit quant-state blob: JSON bytes in a U8 tensor, which bitsandbytes parses."""

    def fn(tensors):
        key = rng.choice(sorted(k for k in tensors if ".quant_state.bitsandbytes__" in k))
        doc = json.loads(bytes(tensors[key].tolist()))
        how = rng.choice(["random", "cut", "not_json", "field", "drop_field", "list", "deep", "empty"])
        if how == "field":
            field_name = rng.choice(sorted(doc))
            doc[field_name] = rng.choice(["x", -1, None, [1, 2, 3], {"a": 1}, 2**70, 0])
            how = f"{field_name}={doc[field_name]!r}"
        if how == "drop_field":
            how = f"no {rng.choice(sorted(doc))}"
            del doc[how[3:]]
        raw = {
            "random": rng.randbytes(len(tensors[key])),
            "cut": json.dumps(doc).encode()[: rng.randrange(1, 40)],
            "not_json": b"not json at all",
            "list": b"[1, 2]",
            "deep": b"[" * 50_000 + b"]" * 50_000,
            "empty": b"",
        }.get(how, json.dumps(doc).encode())
        tensors[key] = torch.tensor(list(raw), dtype=torch.uint8)
        return f"{key}: {how}"

    return edit_tensors(src, fn), ("validate-fast",)  # fast mode reads no tensor data, blobs included


def q_config(rng, src, name):
    config = json.loads((src / "config.json").read_text())
    qc = config["quantization_config"]
    how = rng.choice(
        ["other_bits", "method", "not_a_dict", "empty", "both", "neither", "quant_type", "field", "removed"]
    )
    if how == "other_bits":
        four = bool(qc["load_in_4bit"])
        qc.update(load_in_4bit=not four, _load_in_4bit=not four, load_in_8bit=four, _load_in_8bit=four)
    elif how == "method":
        qc["quant_method"] = rng.choice(
            ["nonsense", "", 5, None, "gptq", "awq", "fp8", "BitsAndBytes", ["bitsandbytes"]]
        )
        how = f"quant_method={qc['quant_method']!r}"
        if qc["quant_method"] in (None, 5):  # transformers falls back to load_in_4bit/8bit: bitsandbytes
            (src / "config.json").write_text(json.dumps(config))
            return f"quantization_config {how}", ("load", "validate", "validate-fast", "save")
    elif how == "not_a_dict":
        config["quantization_config"] = rng.choice([["bitsandbytes"], "bitsandbytes", 4, True])
    elif how == "empty":
        config["quantization_config"] = {}
    elif how in ("both", "neither"):
        flag = how == "both"
        qc.update(load_in_4bit=flag, _load_in_4bit=flag, load_in_8bit=flag, _load_in_8bit=flag)
    elif how == "quant_type":
        qc["bnb_4bit_quant_type"] = rng.choice(["nf5", "", None, 4, "int4"])
        qc.update(load_in_4bit=True, _load_in_4bit=True, load_in_8bit=False, _load_in_8bit=False)
    elif how == "field":
        field_name = rng.choice(["bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_threshold"])
        qc[field_name] = rng.choice(["float99", "int3", -1, [1], {"a": 1}, "high"])
        how = f"{field_name}={qc[field_name]!r}"
        (src / "config.json").write_text(json.dumps(config))
        return f"quantization_config {how}", ("dequantize",)  # it reads the stored blobs, not these
    else:
        del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    return f"quantization_config {how}"


def q_claimed(rng, src, name):
    """A plain checkpoint whose config.json claims bitsandbytes quantization."""
    config = json.loads((src / "config.json").read_text())
    four = rng.random() < 0.5
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "bnb_4bit_quant_type": rng.choice(["nf4", "fp4"]),
        "bnb_4bit_use_double_quant": rng.random() < 0.3,
    }
    (src / "config.json").write_text(json.dumps(config))
    return f"plain tensors, config says {'4' if four else '8'}-bit"


QUANT = {
    "drop": quant_case(q_drop),
    "foreign": quant_case(q_foreign),
    "reshape": quant_case(q_reshape),
    "blob": quant_case(q_blob, sources=("nf4", "nf4_sharded")),
    "config": quant_case(q_config),
    "claimed": quant_case(q_claimed, sources=("plain", "sharded")),
}


@pytest.mark.parametrize("case_id", ids(sorted(QUANT), 150))
def test_quant_state(capsys, tmp_path, fx, case_id):
    run_family(capsys, tmp_path, fx, "quant", QUANT, case_id)


# ----------------------------------------------------------------------------- YAML config

YAML_SECTIONS = ["", "quantize", "runtime", "runtime.compile", "validate", "report"]
WRONG_TYPES = {
    # field path -> values of the wrong type
    "model_class": [1, ["LlamaForCausalLM"], {"a": 1}, True],
    "task": [1, ["causal-lm"]],
    "dtype": [16, ["float16"], {"float16": 1}, True],
    "quantize": ["nf4", ["nf4"], 4, True],
    "quantize.method": [4, ["nf4"], {"nf4": 1}],
    "quantize.double_quant": ["maybe", [True], {"a": 1}, 2],
    "quantize.compute_dtype": [16, ["float16"]],
    "quantize.skip_modules": ["lm_head", 1, [1, 2], {"lm_head": 1}],
    "quantize.int8_threshold": ["high", [6.0], {"a": 1}],
    "dequantize": ["yes please", [True], 2],
    "device_map": [0, ["cpu"], {"": "cpu"}],
    "max_memory": ["2GiB", ["cpu"], 5, {"cpu": [1]}, {"cpu": None}],
    "offload_folder": [1, ["x"], {"a": 1}],
    "tie_weights": ["sometimes", [True], 3],
    "adapters": ["lora", 1, {"path": "x"}, [1], [{"path": 1}], [{"path": "x", "merge": "maybe"}], [{"name": "x"}]],
    "load_adapters": ["no!", [False]],
    "merge_requantize": ["x", [1]],
    "runtime": ["inference", [1]],
    "runtime.mode": [1, ["training"]],
    "runtime.compile": ["yes", [True]],
    "runtime.compile.enabled": ["maybe", [1]],
    "runtime.gradient_checkpointing": ["x", [True]],
    "validate": ["strict", [1]],
    "validate.allow_missing": ["lm_head", 1, [1], [["a"]], {"a": "b"}],
    "validate.check_nan": ["x", [1]],
    "report": [1, "html"],
    "report.quality": ["very", [True]],
    "trust_remote_code": ["yes please", [True], 2],
    "stop_after": [1, ["meta_init"], {"a": 1}],
}
BAD_VALUES = {
    "task": ["causal_lm", "cls", ""],
    "dtype": ["float8", "fp16", "half", "", "int8", "auto "],
    "quantize.method": ["nf5", "4bit", "", "NF4", "gptq"],
    "quantize.compute_dtype": ["float64", "half", "int8"],
    "quantize.quant_storage": ["int4", "uint16", ""],
    "device_map": ["gpu", "cuda", "balanced", "sequential", ""],
    "max_memory": [{"tpu": "1GB"}, {"cpu": "lots"}, {"cpu": "-1GB"}, {"cuda:x": "1GB"}, {"": "1GB"}],
    "runtime.mode": ["eval", "train", ""],
    "runtime.attn_implementation": ["flash3", "", "paged"],
    "runtime.compile.mode": ["fast", ""],
    "validate.fail_on": ["fatal", "info", ""],
    "validate.allow_missing": [["re:("], ["re:[a-"], ["re:*x"]],
    "validate.allow_unexpected": [["re:)"], ["re:(?P<a>x)(?P<a>y)"]],
    "stop_after": ["nowhere", "meta-init", ""],
    "model_class": ["NoSuchModel", "os.system", "AutoModel", "BertForMaskedLM", "__import__", ""],
    "adapters": [[{"path": ""}], [{"path": "no/such/adapter"}], [{"path": "x", "scale": "nan"}]],
}
CROSS_FIELD = [
    {"dequantize": True, "quantize": {"method": "nf4"}},
    {"offload_folder": "off", "device_map": "cpu"},
    {"quantize": {"method": "int8", "double_quant": True}},
    {"quantize": {"method": "none", "double_quant": True}},
    {"dequantize": True},  # the plain checkpoint is not quantized
]


def nest(path: str, value) -> dict:
    doc: dict = {}
    here = doc
    parts = path.split(".")
    for part in parts[:-1]:
        here = here.setdefault(part, {})
    here[parts[-1]] = value
    return doc


def yaml_case(mutate):
    """A YAML mutator (rng, folder) -> (text or bytes, what), run with --config on the plain model."""

    def make(rng, w: Work) -> Case:
        config = w.root / "cfg" / "run.yaml"
        config.parent.mkdir()
        text, what, *lenient = mutate(rng, config.parent)
        if text is not None:
            config.write_bytes(text if isinstance(text, bytes) else text.encode())
        case = Case(what, w.fx["plain"])
        for command in rng.sample(["load", "validate", "validate-fast", "save"], 2):
            case.on([command], ["--config", config], may_pass=command in (lenient[0] if lenient else ()))
        return case

    return make


def dump(doc) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


def y_unknown_key(rng, folder):
    section = rng.choice(YAML_SECTIONS)
    key = rng.choice(
        ["quantise", "methd", "dtype_", "Dtype", "extra", "x" * 300, "1", "adapter", "debug", "allow_pickle"]
    )
    doc = nest(f"{section}.{key}" if section else key, rng.choice([1, "nf4", None, [1], {"a": 1}, True]))
    if rng.random() < 0.5:
        doc.setdefault("dtype", "float32")  # beside a valid key
    return dump(doc), f"unknown key {section}.{key}"


def y_wrong_type(rng, folder):
    path = rng.choice(sorted(WRONG_TYPES))
    value = rng.choice(WRONG_TYPES[path])
    return dump(nest(path, value)), f"{path}: {value!r}"


def y_bad_value(rng, folder):
    if rng.random() < 0.2:
        doc = rng.choice(CROSS_FIELD)
        return dump(doc), f"cross-field {doc}", ("validate-fast",) if doc == {"dequantize": True} else ()
    path = rng.choice(sorted(BAD_VALUES))
    value = rng.choice(BAD_VALUES[path])
    # validate ignores stop_after (the gate runs to the end; the report says so); --fast opens no adapter
    lenient = {"stop_after": ("validate", "validate-fast"), "adapters": ("validate-fast",)}.get(path, ())
    return dump(nest(path, value)), f"{path}: {value!r}", lenient


SYNTAX_BREAKERS = [
    "quantize: [nf4\n", "quantize: {method: nf4\n", "dtype: 'float16\n", 'dtype: "float16\n', "\tdtype: float16\n",
    "a: b: c\n", "- nf4\ndtype: float16\n", "dtype: float16\n  - x\n", "quantize:\n  method: nf4\n method: int8\n",
    "dtype: @float16\n", "dtype: `x`\n", "*undefined_alias\n", "dtype: !!binary x\n", "%YAML 9.9\n---\n",
    "dtype: float16\n...\n---\nx: 1\n", "? [a, b\n", "dtype: |\n x\n  y\n z: 1\n",
]  # fmt: skip


def y_syntax(rng, folder):
    import yaml

    good = dump({"dtype": "float32", "quantize": {"method": "none"}}).splitlines(keepends=True)
    breaker = rng.choice(SYNTAX_BREAKERS)
    at = rng.randint(0, len(good))
    text = "".join(good[:at]) + breaker + "".join(good[at:])
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return text, f"YAML syntax: {breaker!r} at line {at}"
    return text + "[broken\n", f"YAML syntax: {breaker!r} at line {at}, then [broken"


def y_deep(rng, folder):
    depth = rng.choice([50, 500, 5_000, 20_000])
    key = rng.choice(["quantize", "adapters", "validate", "nested_unknown"])
    how = rng.choice(["flow_list", "flow_map", "block_map", "block_list"])
    if how == "flow_list":
        text = f"{key}: " + "[" * depth + "]" * depth + "\n"
    elif how == "flow_map":
        text = f"{key}: " + "{a: " * depth + "1" + "}" * depth + "\n"
    elif how == "block_map":
        depth = min(depth, 2000)
        text = f"{key}:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(depth)) + " " * (depth + 1) + "v\n"
    else:
        depth = min(depth, 2000)
        text = f"{key}:\n" + "".join(" " * (2 * i + 1) + "-\n" for i in range(depth)) + " " * (2 * depth + 1) + "x\n"
    return text, f"{key} nested {depth} deep ({how})"


def y_tags(rng, folder):
    marker = folder / "marker"
    how = rng.choice(["python", "python_name", "binary", "custom", "laughs", "merge"])
    text = {
        "python": f"dtype: !!python/object/apply:os.system ['touch {marker}']\n",
        "python_name": "model_class: !!python/name:os.system\n",
        "binary": "dtype: !!binary aGVsbG8=\n",
        "custom": "quantize: !nf4 {method: nf4}\n",
        "laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        + f"{rng.choice(['validate', 'adapters', 'quantize', 'skip'])}: *i\n",
        "merge": "base: &base {method: nf4}\nquantize:\n  <<: *base\n  methd: int8\n",
    }[how]
    return text, f"tags: {how}"


def y_shape(rng, folder):
    """Not a mapping at the top, not UTF-8, or not a readable file at all."""
    how = rng.choice(["list", "scalar", "number", "utf16", "latin1", "nul", "binary", "folder", "dangling", "loop"])
    config = folder / "run.yaml"
    if how in ("folder", "dangling", "loop"):
        {"folder": lambda: config.mkdir(), "dangling": lambda: config.symlink_to(folder / "nowhere.yaml"),
         "loop": lambda: config.symlink_to(config)}[how]()  # fmt: skip
        return None, f"config file: {how}"
    text = {
        "list": "- dtype: float16\n",
        "scalar": "float16\n",
        "number": "42\n",
        "utf16": "dtype: float16\n".encode("utf-16"),
        "latin1": "dtype: f\xe9\n".encode("latin-1"),
        "nul": b"dtype: float16\x00\n",
        "binary": rng.randbytes(64),
    }[how]
    return text, f"config file: {how}"


YAML = {
    "unknown_key": yaml_case(y_unknown_key),
    "wrong_type": yaml_case(y_wrong_type),
    "bad_value": yaml_case(y_bad_value),
    "syntax": yaml_case(y_syntax),
    "deep": yaml_case(y_deep),
    "tags": yaml_case(y_tags),
    "shape": yaml_case(y_shape),
}


@pytest.mark.parametrize("case_id", ids(sorted(YAML), 180))
def test_yaml_config(capsys, tmp_path, fx, case_id):
    run_family(capsys, tmp_path, fx, "yaml", YAML, case_id)
    assert not (tmp_path / "cfg" / "marker").exists(), "a YAML tag ran code"


# ----------------------------------------------------------------------------- adapter folders

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"


def adapter_case(mutate):
    """An adapter mutator (rng, folder, config dict) -> what, on a copy of the LoRA; the commands
    that apply it (plain base), merged or not."""

    def make(rng, w: Work) -> Case:
        folder = w.copy("lora", "adapter")
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        original = dict(config)
        what = mutate(rng, folder, config)
        what, known = what if isinstance(what, tuple) else (what, None)
        if config and config != original:  # {}: the mutator wrote the folder itself
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
        case = Case(what, w.fx["plain"], known=known)
        for command in rng.sample(["load", "save", "validate"], 2):
            case.on([command], ["--adapter", folder] + (["--merge"] if rng.random() < 0.4 else []))
        return case

    return make


def a_unknown_field(rng, folder, config):
    names = rng.sample(["lora_beta", "target_module", "rank", "alpha", "qfinal", "x" * 100, "use_magic", "r_"], 2)
    for name in names:
        config[name] = rng.choice([1, "x", None, [1], {"a": 1}, True])
    return f"unknown fields {names}", PEFT_IGNORES


PEFT_IGNORES = (
    "peft ignores adapter_config.json fields it does not know and takes a truthy non-bool for a flag; "
    "qfinal neither refuses nor reports them, so a field a newer peft needs is silently dropped"
)


def a_peft_type(rng, folder, config):
    new = rng.choice(["NOPE", "lora", "", 1, None, ["LORA"], "drop", "IA3", "LOHA", "PROMPT_TUNING", "BOFT"])
    if new == "drop":
        del config["peft_type"]
    else:
        config["peft_type"] = new
    return f"peft_type {new!r}"


def a_targets(rng, folder, config):
    new = rng.choice(
        [["nonexistent_proj"], "nonexistent.*", ["q_proj", "nope"], ["k_proj", "o_proj"], "q_proj", [], 5, None,
         ["q_proj", 3], {"q_proj": 1}, ".*", ["embed_tokens"], ["lm_head"], ["self_attn"], ["layers.0.q_proj"]]
    )  # fmt: skip
    config["target_modules"] = new
    return f"target_modules {new!r}"


ADAPTER_FIELDS = {
    "r": [0, -1, "4", 3, 8, None, 4.5],
    "lora_alpha": ["8", None, [8], {"a": 1}],
    "lora_dropout": [2.0, "x", None],
    "bias": ["nope", 1, "all"],
    "task_type": ["NOPE", 5],
    "fan_in_fan_out": ["yes", 2],
    "use_dora": ["yes", 2, True],
    "use_rslora": ["yes", [1]],
    "layers_to_transform": [[99], "x", [-1], 5],
    "layers_pattern": [5, ["nope"]],
    "modules_to_save": [5, [1], {"lm_head": 1}],
    "init_lora_weights": ["maybe", 5],
    "rank_pattern": {"q_proj": "x"},
    "alpha_pattern": [[1], "x", {"q_proj": None}],
    "base_model_name_or_path": [5, ["x"]],
    "exclude_modules": [5, ["q_proj", "v_proj"]],
}


def a_field(rng, folder, config):
    key = rng.choice(sorted(ADAPTER_FIELDS))
    pool = ADAPTER_FIELDS[key]
    config[key] = rng.choice(pool) if isinstance(pool, list) else pool
    flag = key in ("use_rslora", "fan_in_fan_out") and not isinstance(config[key], bool)
    return f"{key}: {config[key]!r}", PEFT_IGNORES if flag else None


def a_files(rng, folder, config):
    how = rng.choice(
        ["no_weights", "no_config", "config_cut", "config_list", "config_deep", "empty_folder", "is_a_file",
         "missing", "pickle_only", "pickle_allowed_payload", "weights_cut", "weights_flip", "weights_pickle",
         "config_folder", "weights_folder"]
    )  # fmt: skip
    cfg, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_FILE
    if how == "no_weights":
        weights.unlink()
    elif how == "no_config":
        cfg.unlink()
    elif how == "config_cut":
        text = cfg.read_text()
        cfg.write_text(text[: rng.randrange(len(text))])
    elif how == "config_list":
        cfg.write_text("[1]")
    elif how == "config_deep":
        cfg.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "empty_folder":
        shutil.rmtree(folder)
        folder.mkdir()
    elif how == "is_a_file":
        shutil.rmtree(folder)
        folder.write_text("not a folder")
    elif how == "missing":
        shutil.rmtree(folder)
    elif how in ("pickle_only", "pickle_allowed_payload"):
        state = load_file(weights)
        weights.unlink()
        if how == "pickle_allowed_payload":
            state["x"] = Payload(folder / "marker")
        torch.save(state, folder / "adapter_model.bin")
    elif how == "weights_cut":
        blob = weights.read_bytes()
        weights.write_bytes(blob[: rng.randrange(len(blob))])
    elif how == "weights_flip":
        blob = bytearray(weights.read_bytes())
        for _ in range(3):
            blob[rng.randrange(8, 8 + int.from_bytes(blob[:8], "little"))] = ord(rng.choice('{}[]":,0123456789'))
        weights.write_bytes(bytes(blob))
    elif how == "weights_pickle":
        torch.save(load_file(weights), weights)
    elif how in ("config_folder", "weights_folder"):
        path = cfg if how == "config_folder" else weights
        path.unlink()
        path.mkdir()
    config.clear()
    return f"adapter folder: {how}"


class Payload:
    """Unpickling this creates `marker`: the shape of a real code-execution payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def a_tensors(rng, folder, config):
    tensors = load_file(folder / ADAPTER_FILE)
    key = rng.choice(sorted(tensors))
    how = rng.choice(["transposed", "rank", "dropped", "extra", "nan", "none_left", "renamed", "scalar"])
    t = tensors[key]
    if how == "transposed":
        tensors[key] = t.t().contiguous()
    elif how == "rank":
        tensors[key] = torch.cat([t, t], dim=0 if "lora_A" in key else 1)
    elif how == "dropped":
        del tensors[key]
    elif how == "extra":
        tensors["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(4, 64)
    elif how == "nan":
        tensors[key] = torch.full_like(t, float("nan"))
    elif how == "none_left":
        tensors.clear()
    elif how == "renamed":
        tensors[key.replace("lora_A", "lora_C").replace("lora_B", "lora_D")] = tensors.pop(key)
    else:
        tensors[key] = torch.tensor(1.0)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    return f"adapter tensor {key}: {how}"


ADAPTER = {
    "unknown_field": adapter_case(a_unknown_field),
    "peft_type": adapter_case(a_peft_type),
    "targets": adapter_case(a_targets),
    "field": adapter_case(a_field),
    "files": adapter_case(a_files),
    "tensors": adapter_case(a_tensors),
}


@pytest.mark.parametrize("case_id", ids(sorted(ADAPTER), 120))
def test_adapter_folder(capsys, tmp_path, fx_lora, case_id):
    run_family(capsys, tmp_path, fx_lora, "adapter", ADAPTER, case_id)
    assert not (tmp_path / "adapter" / "marker").exists(), "the pickle payload ran"
