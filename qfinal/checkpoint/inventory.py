"""What a checkpoint folder holds, by its file layout and safetensors headers, and what is wrong with it.

It never reads tensor data and never unpickles anything on its own. Two callers:

* the loader, which refuses any problem (exit 2) through `CheckpointInventory.raise_for_problems`;
* `qfinal validate`, which reports each problem as a failed check named by `Problem.check`.

So `inspect_checkpoint` COLLECTS problems, where `resolve_inside` and the single-file readers of
`headers` raise the first one as a `CheckpointError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from qfinal.checkpoint.headers import HINTS, TensorEntry, checkpoint_error, escape_key, read_safetensors_header
from qfinal.checkpoint.shard_index import read_index
from qfinal.errors import CheckpointError, SourceError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# Loose pickle weights worth naming when nothing else is there. Not *.bin: Trainer leaves
# training_args.bin (a pickle, not weights) next to every checkpoint.
_LOOSE_PICKLE_GLOBS = ("*.pt", "*.pth", "*.ckpt")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name component over the file system's length limit
        return False


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
        return checkpoint_error(
            f"{what} path '{shown}' {why}; refused",
            file=name if isinstance(name, str) else shown,
            check="file_confinement",
        )

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
        return Finding(
            check=self.check,
            severity="error",
            key=self.key,
            message=f"{where}: {self.message}" if where else self.message,
        )


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
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)  # each read file's __metadata__

    def add(
        self, check: str, message: str, *, file: str | None = None, key: str | None = None, hint: str | None = None
    ) -> None:
        self.problems.append(Problem(check, file, key, message, hint or HINTS.get(check)))

    def add_error(self, err: CheckpointError, check: str | None = None) -> None:
        self.problems.append(
            Problem(
                check or getattr(err, "check", "safetensors_header"),
                getattr(err, "file", None),
                getattr(err, "key", None),
                getattr(err, "detail", err.what),
                err.hint,
            )
        )

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


def inspect_checkpoint(
    root: Path, *, allow_pickle: bool = False, confine_to: Path | None = None
) -> CheckpointInventory:
    """Inventory a model folder's weights the way transformers will pick them, collecting problems.

    Order follows transformers' `_get_resolved_checkpoint_files` for a local folder:
    model.safetensors, then model.safetensors.index.json, then pytorch_model.bin, then
    pytorch_model.bin.index.json; so the files checked are the files that will be loaded.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(
            "not a folder", where=str(root), hint="pass the folder that holds config.json and the weights"
        )
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
        inv.add(
            "checkpoint_files",
            f"no {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME} in the folder",
            file=None,
        )
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
        tensors, inv.metadata[path] = read_safetensors_header(path, display_name=name)
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
        inv.add("checkpoint_files", "is not a readable file (dangling symlink or folder)", file=SAFE_WEIGHTS_NAME)
        return
    inv.files = [path]
    tensors = _read_header_into(inv, path, SAFE_WEIGHTS_NAME)
    if tensors is not None:
        inv.tensors = tensors


def _sharded(inv: CheckpointInventory, index_name: str, confine_to: Path | None, *, read_headers: bool) -> None:
    path = _confined(inv, index_name, confine_to, "index file")
    if path is None:
        return
    weight_map = read_index(inv, path, index_name)
    if weight_map is None:
        return
    shard_keys: dict[str, dict[str, TensorEntry]] = {}  # readable shards only
    for shard in sorted(set(weight_map.values())):  # transformers' shard order
        path = _confined(inv, shard, confine_to, "shard")
        if path is None:
            continue
        if not _is_file(path):
            inv.add("index_consistency", f"shard is listed in {index_name} but missing from the folder", file=shard)
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
                inv.add(
                    "index_consistency",
                    f"present in two shards: '{escape_key(found_in[key])}' and '{escape_key(shard)}'",
                    file=shard,
                    key=key,
                )
                continue
            found_in[key] = shard
            inv.tensors[key] = entry
    for key, shard in weight_map.items():
        if shard in shard_keys and key not in shard_keys[shard]:
            elsewhere = f" (it is in '{escape_key(found_in[key])}')" if key in found_in else ""
            inv.add(
                "index_consistency",
                f"the index maps it to '{escape_key(shard)}', which does not hold it{elsewhere}",
                file=shard,
                key=key,
            )
    for key, shard in found_in.items():
        if key not in weight_map:
            inv.add(
                "index_consistency",
                f"present in '{escape_key(shard)}' but not listed in {index_name}",
                file=shard,
                key=key,
            )


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
            inv.add(
                "pickle_refused",
                "pickle weights can run arbitrary code when loaded; refused "
                "(pass --allow-pickle to load them with torch.load(weights_only=True))",
                file=name,
                hint="or convert them to safetensors in a trusted environment",
            )
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
