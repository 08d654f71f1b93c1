"""One OpenBLAS thread while motion correction runs its own threads.

Motion correction's alignment contracts each frame's spectrum with a few complex exponentials (matrix
products of (1000 × 500) by (500 × 3)), from two threads of its own. OpenBLAS (numpy's, and scipy's) would
split each such product over every core and then spin its helper threads waiting for the next: on this
2-core machine, under load, a product that takes 7 ms of CPU on one thread took 51 ms of CPU on two, and a
movie's alignment 2.5 s of CPU instead of 0.6. So :func:`single_threaded_blas` sets the loaded OpenBLAS
libraries to one thread for the duration (nested and concurrent uses counted; the old count restored by
the last to leave), as threadpoolctl does, without depending on it. Where no OpenBLAS is found (another
BLAS, another platform) it does nothing. Dagster-free.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["single_threaded_blas"]

_NAMES = (  # (set, get) as scipy-openblas (64- and 32-bit integer builds) and plain OpenBLAS export them
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)
_lock = threading.Lock()
_depth = 0
_saved: list[tuple[Callable, int]] = []


def _openblas() -> tuple[tuple[Callable, Callable], ...]:
    """(set, get) of each OpenBLAS library mapped into this process now (read from /proc/self/maps: scipy's
    own is mapped only once scipy.linalg is imported)."""
    import numpy  # noqa: F401  (its OpenBLAS is loaded with it)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return ()
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.restype, getter.restype = None, ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                found.append((setter, getter))
                break
    return tuple(found)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """OpenBLAS at one thread inside the block (module docstring)."""
    global _depth
    with _lock:
        if _depth == 0:
            _saved[:] = [(setter, getter()) for setter, getter in _openblas()]
            for setter, _ in _saved:
                setter(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for setter, threads in _saved:
                    setter(threads)
                _saved.clear()
