"""What can go wrong on a hub download, caught: huggingface_hub's exceptions as one line each, a
file that differs from the hub's listing removed before anything uses it, progress on a TTY only.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

from qfinal.errors import SourceError


def verify_download(path: Path, sibling, where: str) -> None:
    """Size, then sha256 (LFS files) or the git blob id (small files), as the hub lists them."""
    lfs = getattr(sibling, "lfs", None)
    size = path.stat().st_size
    expected_size = listed_size(sibling)
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"arrived with {size} bytes where the hub lists {expected_size}"
    elif lfs and _digest(path, hashlib.sha256()) != lfs.sha256:
        problem = "arrived with a sha256 that differs from the hub's"
    elif not lfs and sibling.blob_id and _digest(path, hashlib.sha1(b"blob %d\0" % size)) != sibling.blob_id:
        problem = "arrived with a git blob id that differs from the hub's"
    if problem is None:
        return
    blob = path.resolve()
    path.unlink(missing_ok=True)  # neither this run nor the next may use it
    blob.unlink(missing_ok=True)
    raise SourceError(f"{problem}; removed from the cache, nothing was used", where=where, hint="run the command again")


def listed_size(sibling) -> int | None:
    """The file's size as the hub lists it (an LFS file's is its pointer's target)."""
    lfs = getattr(sibling, "lfs", None)
    return lfs.size if lfs else getattr(sibling, "size", None)


def _digest(path: Path, h) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def progress_on_tty():
    """huggingface_hub's progress bars on a terminal only, never in CI logs."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not sys.stderr.isatty():
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's network errors: huggingface_hub 2.x uses httpx2, 1.x httpx."""
    for name in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(name).TransportError,)
        except (ImportError, AttributeError):
            continue
    return ()


@contextmanager
def hub_errors(repo_id: str, name: str | None):
    """huggingface_hub's exceptions as one line each (exit 2)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{name}" if name else repo_id
    try:
        yield
    except GatedRepoError:
        raise SourceError(
            "gated repository: access not granted to this token",
            where=where,
            hint="accept its terms on the hub, then set HF_TOKEN (or `hf auth login`)",
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            "repository not found, or private and HF_TOKEN does not grant access",
            where=where,
            hint="check the id; for a private repository set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        raise SourceError("revision not found in the repository", where=where, hint="check --revision") from None
    except OfflineModeIsEnabled:
        raise SourceError("downloads are off (HF_HUB_OFFLINE)", where=where, hint="unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise SourceError(
                f"access refused by the hub (HTTP {status})", where=where, hint="set HF_TOKEN to a token with access"
            ) from None
        raise SourceError(f"the hub answered HTTP {status}", where=where, hint="try again later") from None
    except transport_errors() as err:
        raise SourceError(
            f"the download failed ({type(err).__name__}); nothing was used",
            where=where,
            hint="run the command again: the files already downloaded are kept",
        ) from None
