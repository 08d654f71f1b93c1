"""Keep freed memory in the process for the next tile (glibc malloc), instead of handing it back to the
kernel and faulting it in again, page by page, for the next tile's arrays.

A live-QC process allocates the same arrays for every tile (a 25 MB tile, its strips, the matcher's
buffers). glibc's default returns large freed blocks to the kernel; each new tile's arrays then fault their
pages in again. That costs little on a quiet machine, but beside an ingest and a fusion it cost the live-QC
service 9x the page faults (6.3 million for 240 tiles) and twice the system time, and doubled every tile's
processing time: p95 tile.raw -> qc.tile 1.0-2.9 s instead of 0.4 s (bench_tiles_live --batch-only).

One arena, too: glibc gives each new thread an arena of its own, whose 64 MB heaps it unmaps as soon as
they empty, whatever the trim threshold; a tile's arrays made in a Dask thread then came as fresh pages
every time, and the kernel zeroed them again (huge pages: 7 % of the unpaced chain's samples in
``clear_page_erms``; 750-1,060 page faults and 26-31 ms of system time a tile, 250 and 16-17 ms with one
arena, 147 and 140 against 151 and 156 ms of CPU a tile on a znver3 machine).
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
