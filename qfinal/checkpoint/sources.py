"""Where a model comes from: a local folder, a hub id (`org/name[@revision]`), or `demo`.

A hub id is fetched through checkpoint/hub.py: from the local cache when it has the commit,
otherwise downloaded (only what finalization needs), unless offline.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from qfinal.checkpoint.hub import HUB_ID, HubRequest, fetch, split_hub_id
from qfinal.errors import ConfigError, SourceError

__all__ = [
    "Source",
    "hub_adapters",
    "hub_request",
    "read_config_json",
    "resolve_source",
    "stamp_report",
]


@dataclass(frozen=True)
class Source:
    """A resolved model folder. `confine_to` is the folder every read must stay inside.

    For a hub id: `commit` is the resolved commit, `downloaded` the files fetched by this run,
    and `headers_only` says the weights are header-only stand-ins (plan, validate --fast)."""

    label: str
    folder: Path
    confine_to: Path
    commit: str | None = None
    downloaded: tuple[str, ...] = ()
    downloaded_bytes: int = 0
    headers_only: bool = False

    def hub_record(self) -> dict | None:
        """What the report says about the hub fetch (None for a local folder)."""
        if self.commit is None:
            return None
        return {
            "repo_id": self.label,
            "commit": self.commit,
            "downloaded": list(self.downloaded),
            "downloaded_bytes": self.downloaded_bytes,
            "headers_only": self.headers_only,
        }


def resolve_source(source: str | Path | Source, hub: HubRequest | None = None) -> Source:
    """A local folder, `demo`, or a hub id fetched as `hub` asks (default: download what a load needs).
    A Source is already resolved: returned as it is, so a hub id's branch is looked up once per run."""
    if isinstance(source, Source):
        return source
    hub = hub or HubRequest()
    text = str(source)
    if text == "demo":
        from qfinal.checkpoint.demo import ensure_demo_checkpoint

        folder = ensure_demo_checkpoint()
        return Source("demo", folder, folder)
    path = Path(text).expanduser()
    if path.exists():
        if hub.revision:
            raise ConfigError("--revision applies to a hub id only", where=text, hint="drop it for a local folder")
        if not path.is_dir():
            raise SourceError("not a folder", where=text, hint="pass the folder that holds config.json and the weights")
        return Source(text, path.resolve(), path.resolve())
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        repo_id, revision = split_hub_id(text, hub.revision)
        return from_hub(repo_id, dataclasses.replace(hub, revision=revision))
    raise SourceError("path does not exist", where=text, hint="pass a model folder, a hub id (org/name), or 'demo'")


def hub_request(config, **needs) -> HubRequest:
    """The hub side of a RunConfig (revision, offline, trust_remote_code) plus what the command needs."""
    return HubRequest(
        revision=config.revision, offline=config.offline, trust_remote_code=config.trust_remote_code, **needs
    )


def hub_adapters(config, *, allow_pickle: bool = False):
    """`config` with each adapter given as a hub id (and not a local folder) fetched into the cache
    and pointed at its snapshot; the revision applies to the base model only."""
    changed = []
    for spec in config.adapters:
        text = str(spec.path)
        if Path(text).expanduser().exists() or not HUB_ID.match(text):
            changed.append(spec)
            continue
        repo_id, revision = split_hub_id(text, None)
        req = HubRequest(revision=revision, offline=config.offline, allow_pickle=allow_pickle, adapter=True)
        got = fetch(repo_id, req)
        changed.append(spec.model_copy(update={"path": str(got.folder), "name": spec.name or repo_id.split("/")[1]}))
    if changed == list(config.adapters):
        return config
    return config.model_copy(update={"adapters": changed})


def stamp_report(report, src: Source) -> None:
    """The resolved commit (and what was fetched) on the report of a run on `src`."""
    report.commit = src.commit
    record = src.hub_record()
    if record is not None:
        report.extra["hub"] = record


def from_hub(repo_id: str, hub: HubRequest) -> Source:
    got = fetch(repo_id, hub)
    return Source(
        repo_id,
        got.folder,
        got.confine_to,
        commit=got.commit,
        downloaded=tuple(got.downloaded),
        downloaded_bytes=got.downloaded_bytes,
        headers_only=got.headers_only,
    )


def read_config_json(folder: Path) -> dict:
    """config.json as a dict, with errors a user can act on."""
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(
            "no config.json in the model folder",
            where=str(folder),
            hint="point at the folder written by save_pretrained",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: JSONDecodeError, ints over the digit limit
        raise SourceError(
            f"config.json is not valid JSON ({err})", where=str(path), hint="repair or regenerate config.json"
        ) from None
    except RecursionError:
        raise SourceError(
            "config.json is nested too deeply", where=str(path), hint="repair or regenerate config.json"
        ) from None
    if not isinstance(data, dict):
        raise SourceError("config.json must hold a JSON object", where=str(path))
    return data
