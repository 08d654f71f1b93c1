"""`keep_freed_memory`: a process that allocates a tile's arrays tile after tile gets them from its heap
instead of faulting fresh pages in each time (what cost the live-QC service 9x the page faults beside an
ingest and a fusion)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TILES = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "keep":
    from em_platform.tem.heap import keep_freed_memory
    assert keep_freed_memory(), "mallopt refused the thresholds"

def tile():  # a 5000² tile and one strip of it, freed again, as the live chain does per tile
    image = np.empty((5000, 5000), np.uint8)
    image[...] = 7
    strip = np.empty((1000, 5000), np.uint8)
    strip[...] = image[:1000]

def in_a_thread():  # as a Dask thread, or a store thread that ends with its tile
    thread = threading.Thread(target=tile)
    thread.start()
    thread.join()

each = in_a_thread if sys.argv[2] == "threads" else tile
each()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    each()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("where", ["main", "threads"])
def test_tile_after_tile_the_arrays_come_from_the_heap(where):
    """In threads too: there glibc's per-thread arenas unmapped their heaps as they emptied, whatever the
    thresholds (30 tiles: ~750 faults with the thresholds alone, ~40 with one arena)."""

    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", TILES, mode, where],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return int(done.stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert default > 100  # glibc's default: each tile's arrays are mapped and faulted in afresh
    assert kept < default / 10, (default, kept)
