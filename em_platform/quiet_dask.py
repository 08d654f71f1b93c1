"""Dask settings for the platform's clusters: what an idle cluster costs in CPU, cut to a seventh.

Dask's defaults suit a cluster watched through its dashboard: a statistical profiler sampling every worker
thread every 10 ms, a 20 ms event-loop tick (to warn of a blocked loop), system and memory monitors every
0.5 s and 0.1 s. The platform's clusters serve no dashboard and idle most of the day: `make dev`'s pool (a
scheduler, two worker processes) used 116 ms of CPU a second doing nothing with the defaults, 16 ms with
these (2 × 30 s idle each way, this machine; bench/bench_dask_idle.py); the in-process cluster of a montage
run 39 ms against 6. A blocked loop is still reported (the warning's limit is 3 s) and memory limits are
still enforced (checked every 0.5 s). A setting the environment gives (``DASK_*``) wins over these, except
in docker/compose.yaml's Dask services, which set them.

:data:`QUIET_DASK_CONFIG` is set around in-process clusters (:func:`quiet_dask`); :data:`QUIET_DASK_ENV` is the
same as environment variables, for the scheduler and worker processes of `make dev` and the deployment.
Dask-free at import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.worker.memory.monitor-interval": "500ms",
}


def _env_name(key: str) -> str:
    """Dask's environment spelling of a config key: ``DASK_`` + upper case, ``__`` between levels."""
    return "DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split("."))


QUIET_DASK_ENV = {_env_name(k): str(v) for k, v in QUIET_DASK_CONFIG.items()}


@contextmanager
def quiet_dask() -> Iterator[None]:
    """:data:`QUIET_DASK_CONFIG` for the clusters started inside (Dask reads these when a worker starts), but
    for the settings the environment gives."""
    import dask
    import distributed  # noqa: F401  its defaults first: leaving set() would otherwise drop them all

    with dask.config.set({k: v for k, v in QUIET_DASK_CONFIG.items() if _env_name(k) not in os.environ}):
        yield
