"""A small Hugging Face hub in a thread, for tests that must not touch the network.

It serves what huggingface_hub calls: `GET /api/models/{repo}[/revision/{rev}]` (commit and file
list with sizes, git blob ids and LFS sha256), and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with
X-Repo-Commit, ETag / X-Linked-Etag / X-Linked-Size and byte ranges, from fixture folders. It
counts the bytes of every file body it sends, so a test can say exactly what was downloaded.
Gated repositories answer 401 GatedRepo without a token, 403 with the wrong one; `tamper` serves
other bytes than the ones listed (a truncated or corrupted download); `drop_after` cuts a
connection mid-file once (a network drop, which huggingface_hub resumes with a range request).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_emulator_token"
_LFS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> file -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False
    tamper: dict[str, bytes] = field(default_factory=dict)  # file -> bytes served instead
    drop_after: dict[str, int] = field(default_factory=dict)  # file -> the connection drops after N bytes, once


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sibling(name: str, data: bytes) -> dict:
    entry = {"rfilename": name, "size": len(data), "blobId": _blob_id(data)}
    if name.endswith(_LFS):
        entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
    return entry


class HubEmulator:
    """`with HubEmulator() as hub: hub.add(...)`; `hub.url` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.body_bytes: Counter = Counter()  # file name -> bytes of file bodies sent
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.ranges: list[str | None] = []  # the Range header of each request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubEmulator:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, folder: Path, *, ref: str = "main", gated: bool = False, skip=()) -> str:
        """Publish `folder`'s files as a new commit on `ref`; returns the commit hash."""
        files = {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip
        }
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        digest = hashlib.sha1(repo_id.encode() + ref.encode() + str(len(repo.commits)).encode())
        for name, data in files.items():
            digest.update(name.encode() + hashlib.sha256(data).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.refs[ref] = sha
        return sha

    def weight_bytes(self) -> int:
        """Bytes of weight-file bodies served so far."""
        return sum(n for name, n in self.body_bytes.items() if name.endswith(_LFS))

    def reset_counts(self) -> None:
        with self._lock:
            self.body_bytes.clear()
            self.requests.clear()

    def resolve(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo.refs.get(rev, rev)
        return (repo, sha) if sha in repo.commits else None


def _handler(hub: HubEmulator):
    api = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$")
    resolve = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((self.command, path))
                hub.ranges.append(self.headers.get("Range"))
            if m := api.match(path):
                return self._api(m.group(1), m.group(2) or "main")
            if m := resolve.match(path):
                return self._file(m.group(1), m.group(2), m.group(3), head)
            self._error(404, "RepoNotFound")

        def _allowed(self, repo: Repo) -> bool:
            return not repo.gated or self.headers.get("Authorization") == f"Bearer {TOKEN}"

        def _find(self, repo_id: str, rev: str):
            if repo_id not in hub.repos:
                return self._error(401, "RepoNotFound")
            if not self._allowed(hub.repos[repo_id]):  # no token: 401; a token without access: 403
                return self._error(403 if self.headers.get("Authorization") else 401, "GatedRepo")
            found = hub.resolve(repo_id, rev)
            if found is None:
                return self._error(404, "RevisionNotFound")
            return found

        def _api(self, repo_id: str, rev: str) -> None:
            found = self._find(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            body = json.dumps(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "gated": "auto" if repo.gated else False,
                    "siblings": [_sibling(n, d) for n, d in repo.commits[sha].items()],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo_id: str, rev: str, name: str, head: bool) -> None:
            found = self._find(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            if name not in files:
                return self._error(404, "EntryNotFound")
            listed = files[name]
            data = repo.tamper.get(name, listed)
            start, end, status = 0, len(data) - 1, 200
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if rng:
                start = int(rng.group(1))
                end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
                status = 206
            body = data[start : end + 1]
            self.send_response(status)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("Accept-Ranges", "bytes")
            sibling = _sibling(name, listed)
            etag = sibling["lfs"]["sha256"] if "lfs" in sibling else sibling["blobId"]
            self.send_header("ETag", f'"{etag}"')
            if "lfs" in sibling:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(listed)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                with hub._lock:
                    cut = repo.drop_after.pop(name, None)
                body = body if cut is None else body[:cut]
                self.wfile.write(body)
                with hub._lock:
                    hub.body_bytes[name] += len(body)
                if cut is not None:
                    self.close_connection = True  # short of Content-Length: the client sees a dropped connection

    return Handler
