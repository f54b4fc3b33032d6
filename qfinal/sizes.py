"""Shard sizes as users write them ("2GB", "500MB", "1GiB"), with transformers' own rules; and
the process's peak memory.

Kept free of heavy imports so a bad `--max-shard-size` is refused before torch is loaded, and a
pool worker can report its peak without importing qfinal's config models.
"""

from __future__ import annotations

import resource
import sys

from qfinal.errors import ConfigError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(size: int | str, *, where: str = "--max-shard-size") -> int:
    """Bytes, as transformers' `convert_file_size_to_int` reads it (a lowercase trailing b means bits)."""
    value = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip()
        if text.isdigit():
            value = int(text)
        for unit, factor in _UNITS:
            number = text[: -len(unit)]
            if text.upper().endswith(unit) and number.isdigit():
                value = int(number) * factor
                if not unit.endswith("IB") and text.endswith("b"):
                    value //= 8
                break
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"invalid shard size {size!r}", where=where, hint="use e.g. 2GB, 500MB or 1GiB")
    return value
