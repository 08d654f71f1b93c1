"""How much a block of code allocates: the hostile-size tests bound it."""

from __future__ import annotations

import tracemalloc
from contextlib import contextmanager


@contextmanager
def peak_memory():
    """The peak of Python's allocations inside the block, in bytes (``peak["bytes"]`` after it)."""
    peak = {"bytes": 0}
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak["bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
