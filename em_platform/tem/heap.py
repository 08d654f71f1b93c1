"""Keep freed memory in the process for the next tile (glibc malloc), instead of handing it back to the
kernel and faulting it in again, page by page, for the next tile's arrays.

A live-QC process allocates the same arrays for every tile (a 25 MB tile, its strips, the matcher's
buffers). glibc's default returns large freed blocks to the kernel; each new tile's arrays then fault their
pages in again. That costs little on a quiet machine, but beside an ingest and a fusion it multiplied the
live-QC service's page faults and system time and doubled every tile's processing time
(``bench_tiles_live --batch-only`` shows it).

One arena, too: glibc gives each new thread an arena of its own, whose 64 MB heaps it unmaps as soon as
they empty, whatever the trim threshold; a tile's arrays made in a Dask thread then came as fresh pages
every time, and the kernel zeroed them again (with huge pages, ``clear_page_erms`` stood out in the chain's
profile). One arena cut a tile's page faults and system time by about two thirds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: blocks below it (a 5000² uint8 tile) come from the heap
TRIM_THRESHOLD_BYTES = 1 << 30  # up to this much freed memory stays with the process


def keep_freed_memory() -> bool:
    """Set the two thresholds and one arena for this process (before it starts threads: a thread that
    has an arena keeps it); False where malloc is not glibc's (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(option, value)
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_ARENA_MAX, 1),
        )
    )
