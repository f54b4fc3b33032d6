"""glibc's heap kept flat through a long run of large, short-lived tensors.

glibc serves an allocation from mmap (given back on free) only above its mmap threshold, and raises
that threshold to the size of every mmapped block freed, up to 32 MiB. A streaming merge frees a
few such blocks (an adapter's tensors, read per module) between its slabs, after which the slab-sized
temporaries come from the heap, where a few small live objects keep the freed space from going back:
the 1.1B merge's RSS grew by ~30 MB per decoder layer, to 2.3 GB, and `malloc_trim` gave 400 MB back
at the end. A fixed threshold (which also stops the raising) keeps it flat: at 1 MiB the 7B merge
still crept by ~1 MB/s, its adapter tensors (0.1-0.7 MiB each) fragmenting the heap; at 128 KiB,
glibc's own starting value, the 1.1B and the 7B merges peak at 524 and 528 MB.
Set once per process, for the rest of it; a threshold the user set (MALLOC_MMAP_THRESHOLD_) is kept.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, no longer raised
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_done = False


def keep_heap_flat() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; False where there is no glibc or the user chose one."""
    global _done
    if _done:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _done
