"""glibc heap settings so the buffers apply frees go back to the operating system.

Why: glibc serves a freed large block's size from the heap from then on (its mmap
threshold follows the largest block freed, up to 32 MiB), and worker threads get heaps
of their own. Tensor buffers of a few MiB to 32 MiB then stay resident after the tensor
is written, once per thread, and peak RSS grows with the thread count. A fixed threshold
keeps every block of 4 MiB or more in its own mapping, returned on free; slices smaller
than that are reused from the heap as before (up to TRIM_THRESHOLD kept free per heap). Elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20
# Fixing the mmap threshold also fixes the trim threshold at its 128 KiB default, so the
# heap would shrink and fault back in for every slice; keep this much free at its top.
TRIM_THRESHOLD = 32 << 20

_libc = None
if sys.platform.startswith("linux"):
    try:
        _lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(_lib, "mallopt") and hasattr(_lib, "malloc_trim"):
            _libc = _lib
    except OSError:  # pragma: no cover - no loadable libc
        _libc = None


def return_large_blocks(threshold: int = MMAP_THRESHOLD, arenas: int = 0) -> bool:
    """Serve blocks >= threshold bytes from their own mappings, and (arenas > 0) cap the
    number of heaps threads spread over: each keeps freed memory of its own, and glibc
    opens up to 8 per core when threads contend. Process-wide, stays set. True when
    glibc took the settings."""
    if _libc is None:
        return False
    ok = _libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    ok = ok and _libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if arenas > 0:
        ok = ok and _libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1
    return bool(ok)


def trim() -> None:
    """Hand free heap pages of every arena back to the system (glibc malloc_trim)."""
    if _libc is not None:
        _libc.malloc_trim(0)
