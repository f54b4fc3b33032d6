"""Hub ids: download exactly the files finalization needs, pinned to one commit, checked as they arrive.

Everything goes through huggingface_hub into the standard cache (so transformers and the `hf` CLI
reuse it, and an interrupted download resumes), but qfinal picks the files itself: config.json,
generation_config.json, and the weights transformers would load (model.safetensors, or the index
and exactly the shards it names). A pickle-only repository is refused before a weight byte is
fetched; custom code only with trust_remote_code; tokenizer files only for commands that copy
them. Each file downloaded in this run is checked against the hub's sha256 / git blob id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qfinal.checkpoint.hub_checks import (
    hub_errors,
    listed_size,
    progress_on_tty,
    transport_errors,
    verify_download,
)
from qfinal.errors import CheckpointError, ConfigError, SourceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
CONFIG_FILES = ("config.json", "generation_config.json")
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (  # also the side files `qfinal save` carries along (ops/save.py)
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubRequest:
    """What a command needs from a hub repository, and the trust it was given."""

    revision: str | None = None
    offline: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: bool = False  # side files a command copies (save)
    adapter: bool = False  # a PEFT adapter repository, not a model
    headers_only: bool = False  # plan / validate --fast: config and safetensors headers, no tensor data


@dataclass
class Fetched:
    """A snapshot folder of the repository at `commit` (or a header-only stand-in for it)."""

    repo_id: str
    commit: str
    folder: Path
    confine_to: Path
    downloaded: list[str] = field(default_factory=list)  # files fetched in this run
    downloaded_bytes: int = 0
    headers_only: bool = False


def split_hub_id(text: str, revision: str | None) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); a second, different revision from --revision is an error."""
    repo_id, _, at = text.partition("@")
    if at and revision and at != revision:
        raise ConfigError(
            f"two revisions given: {at!r} in the id and {revision!r}", where="--revision", hint="give one"
        )
    return repo_id, (at or revision or None)


def hub_cache_dir() -> Path:
    """Read at call time (huggingface_hub reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline_requested(flag: bool) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def fetch(repo_id: str, req: HubRequest) -> Fetched:
    """The repository at the requested revision, downloading what is missing unless offline."""
    if offline_requested(req.offline):
        return from_cache(
            repo_id, req.revision, why="downloads are off (HF_HUB_OFFLINE or --offline)", adapter=req.adapter
        )
    if req.revision and COMMIT_HASH.match(req.revision):
        cached = _complete_snapshot(repo_id, req.revision, req)
        if cached is not None:
            return cached  # an exact commit already here: no request at all
    info = _model_info(repo_id, req.revision)
    if info is None:  # the hub cannot be reached: the cache, as transformers falls back to it
        why = f"the hub at {hub_endpoint()} cannot be reached"
        return from_cache(repo_id, req.revision, why=why, adapter=req.adapter)
    commit = info.sha
    if not commit or (req.revision and COMMIT_HASH.match(req.revision) and commit != req.revision):
        raise SourceError(f"the hub answered commit {commit} for {req.revision}", where=repo_id)
    siblings = {s.rfilename: s for s in info.siblings or []}
    fetched = Fetched(repo_id, commit, _snapshot(repo_id, commit), _repo_folder(repo_id).resolve())
    _remember_ref(repo_id, req.revision or "main", commit)
    with progress_on_tty():
        for name in _json_files(siblings, req, f"{repo_id}@{commit[:12]}"):
            _download(fetched, name, siblings[name])
        weights = _weight_files(fetched, siblings, req)  # an index is downloaded here
        tensors = [n for n in weights if n.endswith(".safetensors")]
        if req.headers_only and tensors and not all(_cached(fetched, n) for n in tensors):
            from qfinal.checkpoint.hub_headers import header_stubs

            return header_stubs(fetched, tensors, {n: listed_size(siblings[n]) for n in tensors})
        for name in weights:
            _download(fetched, name, siblings[name])
    return fetched


def from_cache(repo_id: str, revision: str | None, *, why: str, adapter: bool = False) -> Fetched:
    """Today's offline behaviour: the snapshot in the local cache, or a clear error."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=hub_cache_dir()))
        usable = holds_weights(snapshot, adapter=adapter)
    except (FileNotFoundError, OSError, ValueError):
        usable = False
    if not usable:
        at = f"@{revision}" if revision else ""
        raise SourceError(
            f"hub id is not in the local Hugging Face cache and {why}",
            where=repo_id + at,
            hint=f"run `hf download {repo_id}` on a machine with network, or pass a local folder",
        )
    # snapshots/<commit>/file -> ../../blobs/<hash>: the repo's cache folder is the confinement root.
    return Fetched(repo_id, snapshot.name, snapshot, snapshot.parent.parent.resolve())


def _repo_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _snapshot(repo_id: str, commit: str) -> Path:
    return _repo_folder(repo_id) / "snapshots" / commit


def _remember_ref(repo_id: str, revision: str, commit: str) -> None:
    """refs/<branch> -> commit, as huggingface_hub records it, so an offline run finds this snapshot
    (the files themselves are downloaded by commit hash, which records no branch)."""
    if revision == commit or ".." in revision.split("/") or revision.startswith("/"):
        return
    ref = _repo_folder(repo_id) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            tmp = ref.with_name(ref.name + ".qfinal-tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache still serves this run; only a later offline run needs the ref


def _complete_snapshot(repo_id: str, commit: str, req: HubRequest) -> Fetched | None:
    """A cached snapshot of exactly `commit` that holds config.json and every weight file it needs."""
    folder = _snapshot(repo_id, commit)
    if req.tokenizer or req.trust_remote_code:
        return None  # which of those files the repository has, only the hub says
    if not holds_weights(folder, adapter=req.adapter):
        return None
    return Fetched(repo_id, commit, folder, _repo_folder(repo_id).resolve())


def holds_weights(folder: Path, *, adapter: bool = False) -> bool:
    """The folder has its config and weights (not only what a header-only run leaves in the cache)."""
    if adapter:
        return (folder / ADAPTER_FILES[0]).is_file() and any(
            (folder / n).is_file() for n in (ADAPTER_FILES[1], "adapter_model.bin")
        )
    if not (folder / "config.json").is_file():
        return False
    if any((folder / n).is_file() for n in (SAFE_SINGLE, PICKLE_SINGLE)):
        return True
    return any(_holds_shards(folder, index) for index in (SAFE_INDEX, PICKLE_INDEX))


def _holds_shards(folder: Path, index: str) -> bool:
    """The index is cached with every shard it names (a header-only run caches the index alone)."""
    shards = _index_shards(folder / index) if (folder / index).is_file() else None
    return bool(shards) and all((folder / s).is_file() for s in shards)


def _json_files(siblings: dict, req: HubRequest, where: str) -> list[str]:
    names = list(ADAPTER_FILES[:1]) if req.adapter else [n for n in CONFIG_FILES if n in siblings]
    if not req.adapter and "config.json" not in siblings:
        raise SourceError("the repository has no config.json", where=where, hint="is it a model repository?")
    if req.adapter and ADAPTER_FILES[0] not in siblings:
        raise SourceError("the repository has no adapter_config.json", where=where, hint="is it a PEFT adapter?")
    if req.tokenizer:
        names += [n for n in TOKENIZER_FILES if n in siblings]
    if req.trust_remote_code:  # the modeling code config.json's auto_map points at
        names += [n for n in siblings if n.endswith(".py") and "/" not in n]
    return names


def _weight_files(fetched: Fetched, siblings: dict, req: HubRequest) -> list[str]:
    """The files transformers would load, in its order; pickle only with allow_pickle."""
    if req.adapter:
        if ADAPTER_FILES[1] in siblings:
            return [ADAPTER_FILES[1]]
        if "adapter_model.bin" in siblings:
            return _pickle_or_refuse(["adapter_model.bin"], siblings, req, fetched)
        raise SourceError(
            "the repository has no adapter_model.safetensors or adapter_model.bin",
            where=f"{fetched.repo_id}@{fetched.commit[:12]}",
            hint="is it a PEFT adapter?",
        )
    if SAFE_SINGLE in siblings:
        return [SAFE_SINGLE]
    if SAFE_INDEX in siblings:
        return _sharded(fetched, SAFE_INDEX, siblings)
    if PICKLE_SINGLE in siblings or PICKLE_INDEX in siblings:
        return _pickle_or_refuse([PICKLE_SINGLE], siblings, req, fetched)
    raise SourceError(
        f"the repository has no {SAFE_SINGLE}, {SAFE_INDEX} or {PICKLE_SINGLE}",
        where=f"{fetched.repo_id}@{fetched.commit[:12]}",
        hint="qfinal loads transformers checkpoints",
    )


def _pickle_or_refuse(names: list[str], siblings: dict, req: HubRequest, fetched: Fetched) -> list[str]:
    index = PICKLE_INDEX if not req.adapter and names[0] not in siblings else None
    if not req.allow_pickle:
        raise CheckpointError(
            "the repository has only pickle weights, which can run arbitrary code when loaded; refused "
            "before downloading them (pass --allow-pickle to load them with torch.load(weights_only=True))",
            where=f"{fetched.repo_id}/{index or names[0]}",
            hint="or convert them to safetensors in a trusted environment",
        )
    return _sharded(fetched, index, siblings) if index else names


def _sharded(fetched: Fetched, index: str, siblings: dict) -> list[str]:
    """The index (downloaded now) and exactly the shards it names, each one the repository has."""
    _download(fetched, index, siblings[index])
    shards = _index_shards(fetched.folder / index)
    if shards is None:
        raise CheckpointError("index has no readable weight_map", where=f"{fetched.repo_id}/{index}")
    for shard in shards:
        if shard not in siblings:
            raise CheckpointError(
                f"index names shard {shard!r}, which the repository does not have",
                where=f"{fetched.repo_id}/{index}",
                hint="the repository is incomplete at this revision",
            )
    return [index, *shards]


def _index_shards(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return None
    return sorted(set(weight_map.values()))


def _cached(fetched: Fetched, name: str) -> bool:
    return (fetched.folder / name).is_file()


def _download(fetched: Fetched, name: str, sibling) -> None:
    """One file into the cache unless it is there; a new one is checked against the hub's hash."""
    if name in fetched.downloaded or _cached(fetched, name):
        return
    from huggingface_hub import hf_hub_download

    where = f"{fetched.repo_id}@{fetched.commit[:12]}/{name}"
    with hub_errors(fetched.repo_id, name):
        try:
            path = Path(
                hf_hub_download(
                    fetched.repo_id,
                    name,
                    revision=fetched.commit,
                    cache_dir=hub_cache_dir(),
                    endpoint=hub_endpoint(),
                )
            )
        except OSError as err:
            if "Consistency check failed" not in str(err):
                raise
            raise SourceError(
                "the download arrived truncated; nothing was used", where=where, hint="run the command again"
            ) from None
    verify_download(path, sibling, where)
    fetched.downloaded.append(name)
    fetched.downloaded_bytes += path.stat().st_size


def _model_info(repo_id: str, revision: str | None):
    """The repository's commit and file list (with hashes), or None when the hub cannot be reached."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, None):
        try:
            return HfApi(endpoint=hub_endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
        except (ConnectionError, *transport_errors()):  # OfflineModeIsEnabled is a ConnectionError too
            return None
