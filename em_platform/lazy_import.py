"""Modules imported on first use, so that loading the code location (every code server, run process and CLI
call) does not pay for scipy, dask.array, OpenCV, gemmi … until an asset actually computes with them.

Not ``importlib.util.LazyLoader`` (nor lazy_loader, built on it): in the Python this runs (3.12.1) its module
changes its own class before the import executes, so a second thread touching it meanwhile (Dask worker
threads, the live-QC service's pool) fails: eight threads first-touching a lazily loaded ``scipy.ndimage``
gave seven AttributeErrors. ``importlib.import_module`` holds the per-module import lock: every thread
gets the whole module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name``; the first attribute read imports it."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __reduce__(self):  # pickled (a task's globals) as the name, not the module
        return LazyModule, (self._name,)

    def __repr__(self) -> str:
        return f"<module {self._name!r} (imported on first use)>"
