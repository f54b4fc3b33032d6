"""`plan` and `validate --fast` on a hub id: the safetensors headers by HTTP range, no tensor data.

Each shard is stood in for by a sparse file of its real size that holds its real header bytes
(read with two range requests: the 8-byte length, then the header), in a temporary folder beside
the downloaded config.json and index. qfinal's own header parser and checks then run on exactly
the bytes the hub serves, and the data section, never read in these modes, costs no disk.
huggingface_hub's `get_safetensors_metadata` parses the headers itself, so its bytes are not
what qfinal would check.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qfinal.checkpoint.headers import MAX_HEADER_SIZE
from qfinal.checkpoint.hub import Fetched, hub_endpoint
from qfinal.checkpoint.hub_checks import hub_errors
from qfinal.checkpoint.writer import write_header_stub
from qfinal.errors import CheckpointError, SourceError

_WORKERS = 8


def header_stubs(fetched: Fetched, shards: list[str], sizes: dict[str, int | None]) -> Fetched:
    """A folder with the downloaded JSON files and code (custom code's config class, with
    trust_remote_code) and one header-only stand-in per safetensors file in `shards`."""
    folder = Path(tempfile.mkdtemp(prefix="qfinal-headers-"))
    atexit.register(shutil.rmtree, folder, True)
    for path in fetched.folder.iterdir():
        if path.name.endswith((".json", ".py")):
            shutil.copyfile(path, folder / path.name)
    with ThreadPoolExecutor(min(_WORKERS, max(1, len(shards)))) as pool:
        served = list(pool.map(lambda n: _stub(fetched, n, sizes.get(n), folder / n), shards))
    return Fetched(
        fetched.repo_id,
        fetched.commit,
        folder,
        folder.resolve(),
        downloaded=list(fetched.downloaded),
        downloaded_bytes=fetched.downloaded_bytes + sum(served),
        headers_only=True,
    )


def _stub(fetched: Fetched, name: str, size: int | None, dest: Path) -> int:
    """Write `name`'s header into `dest`, sized like the real file; returns the bytes read."""
    where = f"{fetched.repo_id}@{fetched.commit[:12]}/{name}"
    head, total = read_range(fetched, name, 0, 8)
    if size is None:
        size = total
    if len(head) < 8 or size is None:
        raise CheckpointError("shorter than the 8-byte header length", where=where)
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_SIZE or n > size - 8:
        raise CheckpointError(f"header length {n} is not plausible for a {size}-byte file", where=where)
    header, _ = read_range(fetched, name, 8, n)
    if len(header) != n:
        raise CheckpointError("header truncated while reading", where=where)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_header_stub(dest, head + header, size)  # the data section is never read in these modes
    return 8 + n


def read_range(fetched: Fetched, name: str, start: int, length: int) -> tuple[bytes, int | None]:
    """`length` bytes of the file from `start`, and the file's total size from Content-Range.

    Streamed and cut at `length`, so a server that ignores Range costs one connection, not the file."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(fetched.repo_id, name, revision=fetched.commit, endpoint=hub_endpoint())
    headers = build_hf_headers()
    headers.update({"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"})
    data = bytearray()
    with hub_errors(fetched.repo_id, name):
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            if response.status_code != 206:
                raise SourceError(
                    "the hub does not answer range requests; header-only mode needs them",
                    where=f"{fetched.repo_id}/{name}",
                    hint="run the full command, which downloads the weights",
                )
            for chunk in response.iter_bytes():
                data.extend(chunk)
                if len(data) >= length:
                    break
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return bytes(data[:length]), int(total) if total.isdigit() else None
