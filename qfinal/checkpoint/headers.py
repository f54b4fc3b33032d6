"""Reading one safetensors header as untrusted input; the tensor data is never read.

`read_safetensors_header` validates a header the way the safetensors crate does and also refuses
duplicate tensor names, which safetensors silently collapses to the last one; a pickle under a
.safetensors name is told by its content and refused. Each raises the first problem as a
`CheckpointError` that names the file, the tensor and what to do (`checkpoint_error`);
`inventory.inspect_checkpoint` collects them. Pickle weights themselves are `checkpoint.pickles`'.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qfinal.checkpoint.dtypes import CODES
from qfinal.errors import CheckpointError

# Same limit as the safetensors crate (`MAX_HEADER_SIZE`): larger headers are refused unread.
MAX_HEADER_SIZE = 100_000_000
_USIZE_LIMIT = 2**64  # shape dims and offsets are usize in the safetensors crate
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


# ----------------------------------------------------------------------------- errors


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


def checkpoint_error(
    what: str, *, file: str | None, key: str | None = None, check: str = "safetensors_header", hint: str | None = None
) -> CheckpointError:
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


# ----------------------------------------------------------------------------- strict JSON


class JsonRefused(ValueError):
    """Raised from JSON hooks for input Python's json accepts but safetensors (serde) refuses."""


def _reject_constant(name: str):
    raise JsonRefused(f"{name} is not valid JSON")


def check_json_text(text: str, what: str) -> None:
    """Lone surrogates (from \\ud800 escapes) are accepted by Python's json, not by serde or UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefused(f"{what} '{escape_key(text)}' holds an unpaired surrogate escape") from None


def _strict_pairs(pairs):
    """object_pairs_hook: json.loads silently keeps the last of duplicate names; refuse them."""
    out = {}
    for k, v in pairs:
        check_json_text(k, "name")
        if k in out:
            raise JsonRefused(f"duplicate name '{escape_key(k)}' (a JSON reader would silently keep only the last one)")
        out[k] = v
    return out


def strict_json_loads(text: str, object_pairs_hook=_strict_pairs):
    """json.loads that refuses NaN/Infinity (JsonRefused), by default duplicate names as well."""
    return json.loads(text, object_pairs_hook=object_pairs_hook, parse_constant=_reject_constant)


# ----------------------------------------------------------------------------- content sniffing


def file_signature(head: bytes) -> str | None:
    """'pickle' or 'zip' when the first bytes say so (pickle protocol 2-5 opcode, zip local header)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    return None


def zip_holds_pickle(path: Path) -> bool:
    """Whether a zip archive is torch.save's format (it holds a data.pkl)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False


def plausible_safetensors(head: bytes, size: int) -> bool:
    """A header length that fits the file and the limit: then it is read as safetensors."""
    if len(head) < 8:
        return False
    n = int.from_bytes(head[:8], "little")
    return n <= MAX_HEADER_SIZE and n <= size - 8


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


def _display_name(path: Path, root: Path | None) -> str:
    if root is not None:
        for p, r in ((path, root), (path.absolute(), root.absolute())):
            try:
                return p.relative_to(r).as_posix()
            except ValueError:
                pass
    return path.name or str(path)


def read_safetensors_header(
    path: Path, *, root: Path | None = None, display_name: str | None = None
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate and parse a safetensors header; tensor data is never read.

    Returns (tensors by name in header order, __metadata__). Raises CheckpointError naming the
    file (and tensor) for anything safetensors would refuse, plus duplicate tensor names, which
    safetensors silently collapses. `root` only shapes the file names in entries and messages;
    confinement is `inventory.resolve_inside`'s job. `display_name` overrides the name (e.g. the
    index's name for a hub-cache blob).
    """
    path = Path(path)
    name = display_name if display_name is not None else _display_name(path, root)
    raw, data_size = _read_raw_header(path, name)
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for key, info in _parse_header(raw, name).items():
        if key == "__metadata__":
            if info is not None:
                metadata = _metadata(info, name)
            continue
        tensors[key] = _entry(key, info, name, data_size)
    _check_layout(tensors, name, data_size)
    return tensors, metadata


def _read_raw_header(path: Path, name: str) -> tuple[bytes, int]:
    """(the header's JSON bytes, the data section's size), once the length field is proven sane."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if size == 0:
                raise checkpoint_error("file is empty", file=name)
            if len(head) < 8:
                raise checkpoint_error(f"file is {len(head)} bytes, shorter than the 8-byte header length", file=name)
            if not plausible_safetensors(head, size):
                sig = file_signature(head)
                if sig == "pickle" or (sig == "zip" and zip_holds_pickle(path)):
                    raise checkpoint_error(
                        "is a pickle (torch.save) file, not safetensors; refused: qfinal "
                        "reads .safetensors files only as safetensors",
                        file=name,
                        check="pickle_refused",
                        hint="rename it to .bin and pass --allow-pickle, or convert it",
                    )
                if sig == "zip":
                    raise checkpoint_error("is a zip archive, not safetensors", file=name)
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_SIZE:
                raise checkpoint_error(
                    f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit (corrupt or not a safetensors file)",
                    file=name,
                )
            if n > size - 8:
                raise checkpoint_error(
                    f"header length {n} runs past the end of the file ({size} bytes): header truncated", file=name
                )
            raw = f.read(n)
    except CheckpointError:
        raise
    except OSError as err:
        raise checkpoint_error(f"cannot be read ({err.strerror or type(err).__name__})", file=name) from None
    if len(raw) != n:  # file shrank while we read it
        raise checkpoint_error("header truncated while reading", file=name)
    return raw, size - 8 - n


def _parse_header(raw: bytes, name: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise checkpoint_error(f"header is not valid UTF-8 (byte {err.start} of the header)", file=name) from None
    try:
        doc = strict_json_loads(text)
    except JsonRefused as err:
        raise checkpoint_error(f"header JSON refused: {err}", file=name) from None
    except ValueError as err:  # JSONDecodeError, and ints over Python's digit limit
        raise checkpoint_error(f"header is not valid JSON ({str(err).splitlines()[0][:200]})", file=name) from None
    except RecursionError:
        raise checkpoint_error("header JSON is nested too deeply", file=name) from None
    if not isinstance(doc, dict):
        raise checkpoint_error(f"header must be a JSON object, not {type(doc).__name__}", file=name)
    return doc


def _metadata(info, name: str) -> dict[str, str]:
    if not isinstance(info, dict):
        raise checkpoint_error("__metadata__ must be an object of strings", file=name)
    for mk, mv in info.items():
        if not isinstance(mv, str):
            raise checkpoint_error(
                f"__metadata__ value for '{escape_key(mk)}' must be a string, not {type(mv).__name__}", file=name
            )
        try:
            mv.encode("utf-8")
        except UnicodeEncodeError:
            raise checkpoint_error(
                f"__metadata__ value for '{escape_key(mk)}' holds an unpaired surrogate escape", file=name
            ) from None
    return dict(info)


def _check_layout(tensors: dict[str, TensorEntry], name: str, data_size: int) -> None:
    """Sorted by offsets, the ranges must tile [0, data_size) exactly, as the crate checks."""
    prev: TensorEntry | None = None
    pos = 0
    for e in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if e.start < pos:
            raise checkpoint_error(
                f"data_offsets [{e.start}, {e.end}] overlap tensor "
                f"'{escape_key(prev.name)}' [{prev.start}, {prev.end}]",
                file=name,
                key=e.name,
            )
        if e.start > pos:
            raise checkpoint_error(
                f"{e.start - pos} unused bytes before it (gap at data offset {pos})", file=name, key=e.name
            )
        pos, prev = e.end, e
    if pos != data_size:
        raise checkpoint_error(
            f"{data_size - pos} trailing bytes after the last tensor (data section is "
            f"{data_size} bytes, tensors cover {pos})",
            file=name,
        )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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


def _entry(key: str, info, name: str, data_size: int) -> TensorEntry:
    def bad(what: str) -> CheckpointError:
        return checkpoint_error(what, file=name, key=key)

    if not isinstance(info, dict):
        raise bad(f"entry must be an object, not {type(info).__name__}")
    for field_name in ("dtype", "shape", "data_offsets"):
        if field_name not in info:
            raise bad(f"entry has no '{field_name}'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in CODES:
        raise bad(f"unknown dtype '{escape_key(str(dtype))}'")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _USIZE_LIMIT for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and 0 <= o < _USIZE_LIMIT for o in offsets)
    ):
        raise bad("data_offsets must be two non-negative integers")
    start, end = offsets
    shape_t = tuple(shape)
    if end < start:
        raise bad(f"data_offsets [{start}, {end}] end before they start")
    bits = CODES[dtype].bits
    nbits = _nbits(shape_t, bits, 8 * max(end - start, 0) + bits)
    if nbits is None or nbits != 8 * (end - start):
        need = "more than the file holds" if nbits is None else f"{nbits / 8:g} bytes"
        raise bad(
            f"dtype {dtype} with shape {list(shape_t)} needs {need}, but data_offsets "
            f"[{start}, {end}] span {end - start} bytes"
        )
    if end > data_size:
        raise bad(
            f"data_offsets [{start}, {end}] reach past the end of the data section "
            f"({data_size} bytes): file truncated or offsets wrong"
        )
    return TensorEntry(name=key, dtype=dtype, shape=shape_t, start=start, end=end, file=name)
