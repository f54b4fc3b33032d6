"""qfinal's own reader of a checkpoint folder's file layout and safetensors headers.

It never reads tensor data and never unpickles anything on its own. Two callers:

* the loader, which refuses any problem (exit 2) through `CheckpointInventory.raise_for_problems`;
* `qfinal validate`, which reports each problem as a failed check named by `Problem.check`.

So `inspect_checkpoint` COLLECTS problems; the single-purpose functions (`read_safetensors_header`,
`resolve_inside`, `safe_torch_load`) raise the first one as a `CheckpointError`.

Why not just trust `safetensors`: it silently keeps the last of two tensors with the same name,
and the loader needs errors that name the file, the key and what to do, collected per folder.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from qfinal.errors import CheckpointError, SourceError

# Same limit as the safetensors crate (`MAX_HEADER_SIZE`): larger headers are refused unread.
MAX_HEADER_SIZE = 100_000_000
# Index files are JSON we parse whole; the largest real ones are a few MB.
MAX_INDEX_SIZE = 100_000_000

# Every dtype code safetensors 0.8 accepts, with its size in bits (F4/F6 are sub-byte, packed).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_USIZE_LIMIT = 2**64  # shape dims and offsets are usize in the safetensors crate

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Loose pickle weights worth naming when nothing else is there. Not *.bin: Trainer leaves
# training_args.bin (a pickle, not weights) next to every checkpoint.
_LOOSE_PICKLE_GLOBS = ("*.pt", "*.pth", "*.ckpt")

_KEY_MAX = 200

HINTS = {
    "safetensors_header": "re-download the file, or re-save the model with save_pretrained",
    "index_consistency": "restore the missing shard or regenerate the index (save_pretrained writes it)",
    "file_confinement": "weight files must stay inside the model folder: fix the index, or replace "
                        "the symlink with the file itself",
    "pickle_refused": "pass --allow-pickle to load it with torch.load(weights_only=True), "
                      "or convert it to safetensors in a trusted environment",
    "checkpoint_files": "point at a folder written by save_pretrained",
}


# ----------------------------------------------------------------------------- small helpers


def escape_key(key: str) -> str:
    """Printable one-line form of a tensor name or file name from an untrusted header.

    Control characters, newlines, bidi overrides and other non-printables become escapes, so a
    crafted name cannot forge report lines or terminal output; very long names are cut.
    """
    if not isinstance(key, str):
        key = repr(key)
    out = []
    for ch in key[:_KEY_MAX]:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    text = "".join(out)
    if len(key) > _KEY_MAX:
        text += f"…(+{len(key) - _KEY_MAX} chars)"
    return text


def _error(what: str, *, file: str | None, key: str | None = None, check: str = "safetensors_header",
           hint: str | None = None) -> CheckpointError:
    """A CheckpointError that also remembers its file/key/check, so inventories can collect it."""
    where = escape_key(file) if file is not None else None
    detail = what
    if key is not None:
        what = f"tensor '{escape_key(key)}': {what}"
    err = CheckpointError(what, where=where, hint=hint if hint is not None else HINTS.get(check))
    err.file = file  # type: ignore[attr-defined]
    err.key = key  # type: ignore[attr-defined]
    err.check = check  # type: ignore[attr-defined]
    err.detail = detail  # type: ignore[attr-defined]  # `what` without the tensor prefix
    return err


class _JsonReject(ValueError):
    """Raised from JSON hooks for input Python's json accepts but safetensors (serde) refuses."""


def _reject_constant(name: str):
    raise _JsonReject(f"{name} is not valid JSON")


def _check_text(text: str, what: str) -> None:
    """Lone surrogates (from \\ud800 escapes) are accepted by Python's json, not by serde or UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _JsonReject(f"{what} '{escape_key(text)}' holds an unpaired surrogate escape") from None


def _strict_pairs(pairs):
    """object_pairs_hook: json.loads silently keeps the last of duplicate names; refuse them."""
    out = {}
    for k, v in pairs:
        _check_text(k, "name")
        if k in out:
            raise _JsonReject(f"duplicate name '{escape_key(k)}' (a JSON reader would silently keep "
                              "only the last one)")
        out[k] = v
    return out


def _display_name(path: Path, root: Path | None) -> str:
    if root is not None:
        for p, r in ((path, root), (path.absolute(), root.absolute())):
            try:
                return p.relative_to(r).as_posix()
            except ValueError:
                pass
    return path.name or str(path)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name component over the file system's length limit
        return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _signature(head: bytes) -> str | None:
    """'pickle' or 'zip' when the first bytes say so (pickle protocol 2-5 opcode, zip local header)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    return None


def _zip_holds_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False


def _plausible_safetensors(head: bytes, size: int) -> bool:
    """A header length that fits the file and the limit: then it is read as safetensors."""
    if len(head) < 8:
        return False
    n = int.from_bytes(head[:8], "little")
    return n <= MAX_HEADER_SIZE and n <= size - 8


def is_pickle_file(path: Path) -> bool:
    """True for pickle weights, by extension or by content signature.

    Signatures: pickle protocol opcode \\x80 + protocol 2..5 at the start (unless the first 8
    bytes also make a plausible safetensors header length: \\x80\\x02 + six zero bytes is a valid
    640-byte header), or a zip whose entries include */data.pkl (torch.save's zip format).
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    sig = _signature(head)
    if sig == "pickle":
        return not _plausible_safetensors(head, size)
    if sig == "zip":
        return _zip_holds_pickle(path)
    return False


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class TensorEntry:
    """One safetensors header entry. Offsets are relative to the data section (after the header)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: str  # shard file name relative to the root

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _nbits(shape: tuple[int, ...], bits: int, limit: int) -> int | None:
    """prod(shape) * bits, or None once it passes `limit` (so huge dims cost nothing)."""
    if 0 in shape:
        return 0
    total = bits
    for d in shape:
        total *= d
        if total > limit:
            return None
    return total


def read_safetensors_header(path: Path, *, root: Path | None = None, display_name: str | None = None
                            ) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate and parse a safetensors header; tensor data is never read.

    Returns (tensors by name in header order, __metadata__). Raises CheckpointError naming the
    file (and tensor) for anything safetensors would refuse, plus duplicate tensor names, which
    safetensors silently collapses. `root` only shapes the file names in entries and messages;
    confinement is `resolve_inside`'s job. `display_name` overrides the name (e.g. the index's
    name for a hub-cache blob).
    """
    path = Path(path)
    name = display_name if display_name is not None else _display_name(path, root)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if size == 0:
                raise _error("file is empty", file=name)
            if len(head) < 8:
                raise _error(f"file is {len(head)} bytes, shorter than the 8-byte header length",
                             file=name)
            if not _plausible_safetensors(head, size):
                sig = _signature(head)
                if sig == "pickle" or (sig == "zip" and _zip_holds_pickle(path)):
                    raise _error("is a pickle (torch.save) file, not safetensors; refused: qfinal "
                                 "reads .safetensors files only as safetensors", file=name,
                                 check="pickle_refused",
                                 hint="rename it to .bin and pass --allow-pickle, or convert it")
                if sig == "zip":
                    raise _error("is a zip archive, not safetensors", file=name)
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_SIZE:
                raise _error(f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit "
                             "(corrupt or not a safetensors file)", file=name)
            if n > size - 8:
                raise _error(f"header length {n} runs past the end of the file ({size} bytes): "
                             "header truncated", file=name)
            raw = f.read(n)
    except CheckpointError:
        raise
    except OSError as err:
        raise _error(f"cannot be read ({err.strerror or type(err).__name__})", file=name) from None
    if len(raw) != n:  # file shrank while we read it
        raise _error("header truncated while reading", file=name)
    data_size = size - 8 - n

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _error(f"header is not valid UTF-8 (byte {err.start} of the header)", file=name) from None
    try:
        doc = json.loads(text, object_pairs_hook=_strict_pairs, parse_constant=_reject_constant)
    except _JsonReject as err:
        raise _error(f"header JSON refused: {err}", file=name) from None
    except ValueError as err:  # JSONDecodeError, and ints over Python's digit limit
        raise _error(f"header is not valid JSON ({str(err).splitlines()[0][:200]})", file=name) from None
    except RecursionError:
        raise _error("header JSON is nested too deeply", file=name) from None
    if not isinstance(doc, dict):
        raise _error(f"header must be a JSON object, not {type(doc).__name__}", file=name)

    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for key, info in doc.items():
        if key == "__metadata__":
            if info is None:
                continue
            if not isinstance(info, dict):
                raise _error("__metadata__ must be an object of strings", file=name)
            for mk, mv in info.items():
                if not isinstance(mv, str):
                    raise _error(f"__metadata__ value for '{escape_key(mk)}' must be a string, "
                                 f"not {type(mv).__name__}", file=name)
                try:
                    mv.encode("utf-8")
                except UnicodeEncodeError:
                    raise _error(f"__metadata__ value for '{escape_key(mk)}' holds an unpaired "
                                 "surrogate escape", file=name) from None
            metadata = dict(info)
            continue
        tensors[key] = _entry(key, info, name, data_size)

    # Layout: sorted by offsets, ranges must tile [0, data_size) exactly, like the crate checks.
    prev: TensorEntry | None = None
    pos = 0
    for e in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if e.start < pos:
            raise _error(f"data_offsets [{e.start}, {e.end}] overlap tensor "
                         f"'{escape_key(prev.name)}' [{prev.start}, {prev.end}]", file=name, key=e.name)
        if e.start > pos:
            raise _error(f"{e.start - pos} unused bytes before it (gap at data offset {pos})",
                         file=name, key=e.name)
        pos, prev = e.end, e
    if pos != data_size:
        raise _error(f"{data_size - pos} trailing bytes after the last tensor (data section is "
                     f"{data_size} bytes, tensors cover {pos})", file=name)
    return tensors, metadata


def _entry(key: str, info, name: str, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _error(f"entry must be an object, not {type(info).__name__}", file=name, key=key)
    for field_name in ("dtype", "shape", "data_offsets"):
        if field_name not in info:
            raise _error(f"entry has no '{field_name}'", file=name, key=key)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _error(f"unknown dtype '{escape_key(str(dtype))}'", file=name, key=key)
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _USIZE_LIMIT for d in shape):
        raise _error("shape must be a list of non-negative integers", file=name, key=key)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and 0 <= o < _USIZE_LIMIT for o in offsets)):
        raise _error("data_offsets must be two non-negative integers", file=name, key=key)
    start, end = offsets
    shape_t = tuple(shape)
    if end < start:
        raise _error(f"data_offsets [{start}, {end}] end before they start", file=name, key=key)
    bits = DTYPE_BITS[dtype]
    nbits = _nbits(shape_t, bits, 8 * max(end - start, 0) + bits)
    if nbits is None or nbits != 8 * (end - start):
        need = "more than the file holds" if nbits is None else f"{nbits / 8:g} bytes"
        raise _error(f"dtype {dtype} with shape {list(shape_t)} needs {need}, but data_offsets "
                     f"[{start}, {end}] span {end - start} bytes", file=name, key=key)
    if end > data_size:
        raise _error(f"data_offsets [{start}, {end}] reach past the end of the data section "
                     f"({data_size} bytes): file truncated or offsets wrong", file=name, key=key)
    return TensorEntry(name=key, dtype=dtype, shape=shape_t, start=start, end=end, file=name)


# ----------------------------------------------------------------------------- confinement


def resolve_inside(root: Path, name: str, *, what: str = "file", confine_to: Path | None = None) -> Path:
    """`root / name`, resolved, refused unless it stays inside `confine_to` (default: root).

    Refuses absolute paths, drive letters, backslashes, NUL, any `..` component, and anything,
    symlinks at any level included, whose resolved path leaves the confinement folder. For a hub
    cache snapshot pass confine_to=<repo cache folder>: its files link to ../../blobs.
    """
    root = Path(root)
    shown = escape_key(name) if isinstance(name, str) else repr(name)

    def refuse(why: str) -> CheckpointError:
        return _error(f"{what} path '{shown}' {why}; refused", file=name if isinstance(name, str) else shown,
                      check="file_confinement")

    if not isinstance(name, str) or not name:
        raise refuse("is empty or not a string")
    if "\x00" in name:
        raise refuse("contains a NUL byte")
    if "\\" in name or PureWindowsPath(name).drive:
        raise refuse("uses a backslash or drive letter")
    if PurePosixPath(name).is_absolute():
        raise refuse("is absolute")
    if ".." in PurePosixPath(name).parts:
        raise refuse("contains a '..' component")
    try:
        base = Path(confine_to if confine_to is not None else root).resolve()
        resolved = (root / name).resolve()
    except (OSError, RuntimeError) as err:  # symlink loops, overlong names
        raise refuse(f"cannot be resolved ({type(err).__name__})") from None
    if not resolved.is_relative_to(base):
        raise refuse(f"resolves outside the model folder ({escape_key(str(resolved))})")
    return resolved


# ----------------------------------------------------------------------------- inventory


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint folder. `check` names are stable (CI filters on them):
    safetensors_header, index_consistency, file_confinement, pickle_refused, checkpoint_files.
    `file` and `key` are raw (unescaped); `message` is one printable line."""

    check: str
    file: str | None
    key: str | None
    message: str
    hint: str | None = None

    def where(self) -> str | None:
        parts = [escape_key(self.file)] if self.file is not None else []
        if self.key is not None:
            parts.append(f"[{escape_key(self.key)}]")
        return " ".join(parts) or None

    def to_finding(self):
        """As a report Finding (severity error) for `qfinal validate`."""
        from qfinal.report import Finding

        where = self.where()
        return Finding(check=self.check, severity="error", key=self.key,
                       message=f"{where}: {self.message}" if where else self.message)


@dataclass
class CheckpointInventory:
    """What a checkpoint folder holds, by its files and headers only, and what is wrong with it."""

    root: Path
    files: list[Path] = field(default_factory=list)
    format: str = "safetensors"
    index: dict | None = None
    sharded_metadata: dict | None = None
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def add(self, check: str, message: str, *, file: str | None = None, key: str | None = None,
            hint: str | None = None) -> None:
        self.problems.append(Problem(check, file, key, message, hint or HINTS.get(check)))

    def add_error(self, err: CheckpointError, check: str | None = None) -> None:
        self.problems.append(Problem(check or getattr(err, "check", "safetensors_header"),
                                     getattr(err, "file", None), getattr(err, "key", None),
                                     getattr(err, "detail", err.what), err.hint))

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """CheckpointError for the first problem; the message says how many more there are."""
        if not self.problems:
            return
        p = self.problems[0]
        what = p.message
        more = len(self.problems) - 1
        if more:
            what += f" (+{more} more problem{'s' if more > 1 else ''}; `qfinal validate` lists all)"
        err = CheckpointError(what, where=p.where(), hint=p.hint)
        err.file, err.key, err.check = p.file, p.key, p.check  # type: ignore[attr-defined]
        raise err


def inspect_checkpoint(root: Path, *, allow_pickle: bool = False,
                       confine_to: Path | None = None) -> CheckpointInventory:
    """Inventory a model folder's weights the way transformers will pick them, collecting problems.

    Order follows transformers' `_get_resolved_checkpoint_files` for a local folder:
    model.safetensors, then model.safetensors.index.json, then pytorch_model.bin, then
    pytorch_model.bin.index.json; so the files checked are the files that will be loaded.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError("not a folder", where=str(root),
                          hint="pass the folder that holds config.json and the weights")
    inv = CheckpointInventory(root=root)

    def present(name: str) -> bool:  # lexists: a symlink pointing outside still counts (and is refused)
        return os.path.lexists(root / name)

    if present(SAFE_WEIGHTS_NAME):
        _single_safetensors(inv, confine_to)
    elif present(SAFE_WEIGHTS_INDEX_NAME):
        _sharded(inv, SAFE_WEIGHTS_INDEX_NAME, confine_to, read_headers=True)
    elif present(WEIGHTS_NAME) or present(WEIGHTS_INDEX_NAME) or _loose_pickles(root):
        _pickle(inv, allow_pickle, confine_to)
    else:
        inv.add("checkpoint_files", f"no {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or "
                f"{WEIGHTS_NAME} in the folder", file=None)
    return inv


def _loose_pickles(root: Path) -> list[str]:
    names = set()
    for pattern in _LOOSE_PICKLE_GLOBS:
        names.update(p.name for p in root.glob(pattern))
    return sorted(names)


def _confined(inv: CheckpointInventory, name: str, confine_to: Path | None, what: str) -> Path | None:
    """The file as `root/name` once it is proven to resolve inside the confinement folder.

    Not the resolved path: in the hub cache that is an extension-less blob, and transformers
    decides safetensors vs pickle by the file name's extension.
    """
    try:
        resolve_inside(inv.root, name, what=what, confine_to=confine_to)
        return inv.root / name
    except CheckpointError as err:
        inv.add_error(err, "file_confinement")
        return None


def _read_header_into(inv: CheckpointInventory, path: Path, name: str) -> dict[str, TensorEntry] | None:
    # Named as the index names it: the resolved path may be a hub-cache blob.
    try:
        tensors, _ = read_safetensors_header(path, display_name=name)
    except CheckpointError as err:
        inv.add_error(err)
        return None
    return tensors


def _single_safetensors(inv: CheckpointInventory, confine_to: Path | None) -> None:
    inv.format = "safetensors"
    path = _confined(inv, SAFE_WEIGHTS_NAME, confine_to, "weights file")
    if path is None:
        return
    if not _is_file(path):
        inv.add("checkpoint_files", "is not a readable file (dangling symlink or folder)",
                file=SAFE_WEIGHTS_NAME)
        return
    inv.files = [path]
    tensors = _read_header_into(inv, path, SAFE_WEIGHTS_NAME)
    if tensors is not None:
        inv.tensors = tensors


def _read_index(inv: CheckpointInventory, index_name: str, confine_to: Path | None) -> dict | None:
    """Parse and shape-check an index file. Duplicate names become problems, not parse failures."""
    path = _confined(inv, index_name, confine_to, "index file")
    if path is None:
        return None
    bad = lambda msg: inv.add("index_consistency", msg, file=index_name)  # noqa: E731
    try:
        size = path.stat().st_size
        if size > MAX_INDEX_SIZE:
            bad(f"index is {size} bytes, over the {MAX_INDEX_SIZE}-byte limit")
            return None
        raw = path.read_bytes()
    except OSError as err:
        bad(f"index cannot be read ({err.strerror or type(err).__name__})")
        return None
    dups: list[tuple[str, object, object]] = []

    def pairs(items):
        out = {}
        for k, v in items:
            _check_text(k, "name")
            if isinstance(v, str):
                _check_text(v, "value")
            if k in out:
                dups.append((k, out[k], v))
            out[k] = v
        return out

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        bad(f"index is not valid UTF-8 (byte {err.start})")
        return None
    except _JsonReject as err:
        bad(f"index JSON refused: {err}")
        return None
    except ValueError as err:
        bad(f"index is not valid JSON ({str(err).splitlines()[0][:200]})")
        return None
    except RecursionError:
        bad("index JSON is nested too deeply")
        return None
    if not isinstance(doc, dict):
        bad(f"index must be a JSON object, not {type(doc).__name__}")
        return None
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        bad("index has no \"weight_map\" object")
        return None
    for k, v in weight_map.items():
        if not isinstance(v, str):
            inv.add("index_consistency", f"weight_map value must be a file name, not {type(v).__name__}",
                    file=index_name, key=k)
    if any(not isinstance(v, str) for v in weight_map.values()):
        return None
    for k, first, second in dups:
        if isinstance(first, str) and isinstance(second, str) and k in weight_map:
            inv.add("index_consistency", f"listed twice in the index: in '{escape_key(first)}' and in "
                    f"'{escape_key(second)}'", file=index_name, key=k)
        else:
            inv.add("index_consistency", f"duplicate name '{escape_key(k)}' in the index JSON",
                    file=index_name)
    metadata = doc.get("metadata")
    if metadata is None:
        # transformers' get_checkpoint_shard_files does index["metadata"]: it would crash.
        bad("index has no \"metadata\" object (transformers requires one; {} is enough)")
        metadata = {}
    elif not isinstance(metadata, dict):
        bad(f"index \"metadata\" must be an object, not {type(metadata).__name__}")
        metadata = {}
    inv.index = doc
    # Exactly what transformers.utils.hub.get_checkpoint_shard_files builds.
    inv.sharded_metadata = dict(metadata)
    inv.sharded_metadata["all_checkpoint_keys"] = list(weight_map.keys())
    inv.sharded_metadata["weight_map"] = weight_map.copy()
    return weight_map


def _sharded(inv: CheckpointInventory, index_name: str, confine_to: Path | None, *,
             read_headers: bool) -> None:
    weight_map = _read_index(inv, index_name, confine_to)
    if weight_map is None:
        return
    shard_keys: dict[str, dict[str, TensorEntry]] = {}  # readable shards only
    for shard in sorted(set(weight_map.values())):  # transformers' shard order
        path = _confined(inv, shard, confine_to, "shard")
        if path is None:
            continue
        if not _is_file(path):
            inv.add("index_consistency", f"shard is listed in {index_name} but missing from the folder",
                    file=shard)
            continue
        inv.files.append(path)
        if read_headers:
            tensors = _read_header_into(inv, path, shard)
            if tensors is not None:
                shard_keys[shard] = tensors
    if not read_headers:
        return

    found_in: dict[str, str] = {}
    for shard, tensors in shard_keys.items():
        for key, entry in tensors.items():
            if key in found_in:
                inv.add("index_consistency", f"present in two shards: '{escape_key(found_in[key])}' "
                        f"and '{escape_key(shard)}'", file=shard, key=key)
                continue
            found_in[key] = shard
            inv.tensors[key] = entry
    for key, shard in weight_map.items():
        if shard in shard_keys and key not in shard_keys[shard]:
            elsewhere = f" (it is in '{escape_key(found_in[key])}')" if key in found_in else ""
            inv.add("index_consistency", f"the index maps it to '{escape_key(shard)}', which does not "
                    f"hold it{elsewhere}", file=shard, key=key)
    for key, shard in found_in.items():
        if key not in weight_map:
            inv.add("index_consistency", f"present in '{escape_key(shard)}' but not listed in "
                    f"{index_name}", file=shard, key=key)


def _pickle(inv: CheckpointInventory, allow_pickle: bool, confine_to: Path | None) -> None:
    inv.format = "pickle"
    root = inv.root
    if os.path.lexists(root / WEIGHTS_NAME):
        names = [WEIGHTS_NAME]
    elif os.path.lexists(root / WEIGHTS_INDEX_NAME):
        names = None
    else:
        names = _loose_pickles(root)
    if not allow_pickle:
        shown = names if names is not None else [WEIGHTS_INDEX_NAME]
        for name in shown:
            inv.add("pickle_refused", "pickle weights can run arbitrary code when loaded; refused "
                    "(pass --allow-pickle to load them with torch.load(weights_only=True))", file=name,
                    hint="or convert them to safetensors in a trusted environment")
        return
    if names is None:
        _sharded(inv, WEIGHTS_INDEX_NAME, confine_to, read_headers=False)
        return
    for name in names:
        path = _confined(inv, name, confine_to, "weights file")
        if path is None:
            continue
        if not _is_file(path):
            inv.add("checkpoint_files", "is not a readable file (dangling symlink or folder)", file=name)
            continue
        inv.files.append(path)


# ----------------------------------------------------------------------------- pickle loading


def safe_torch_load(path: Path) -> dict:
    """Load pickle weights with torch.load(weights_only=True), which refuses arbitrary globals.

    Any refusal or read failure becomes a CheckpointError: the file is untrusted input, so a
    failure is the file's fault, not a qfinal bug. The result must be a str -> Tensor dict.
    """
    import pickle

    import torch

    path = Path(path)
    name = path.name
    hint = "convert the checkpoint to safetensors in a trusted environment, or get a safetensors copy"
    try:
        use_mmap = zipfile.is_zipfile(path)  # mmap needs the zip format
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+?)(?: was|\s|$)", str(err))
        detail = f" (it imports {escape_key(found.group(1)[:200])})" if found else ""
        raise _error(f"refused: pickle would run code or build objects that "
                     f"torch.load(weights_only=True) does not allow{detail}", file=name,
                     check="pickle_refused", hint=hint) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes is the file's fault
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise _error(f"cannot be loaded by torch.load ({type(err).__name__}: {escape_key(first)})",
                     file=name, check="pickle_refused", hint=hint) from None
    if not isinstance(obj, dict):
        raise _error(f"holds a {type(obj).__name__}, not a state dict of tensors", file=name,
                     check="pickle_refused", hint=hint)
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise _error(f"state dict entry is a {type(value).__name__}, not a tensor",
                         file=name, key=str(key), check="pickle_refused", hint=hint)
    return obj
