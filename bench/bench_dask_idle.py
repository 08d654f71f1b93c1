"""What a Dask pool costs doing nothing: Dask's defaults against em_platform.quiet_dask's settings.

`make dev` and the deployment keep a scheduler and its workers up all day, waiting for runs. This starts
`make dev`'s pool (em_platform.dev.DaskPool: a scheduler and a single-thread worker process per core, on
loopback, no dashboard), lets it settle, and counts the CPU time of all its processes over ``--seconds`` of
idling; once with Dask's defaults, once with ``QUIET_DASK_ENV`` (the pool's default), alternating ``--rounds``
times. The ratio is what the quiet settings save; results in bench/results/dask_idle.json.

    python -m bench.bench_dask_idle              # 2 rounds of 30 s each way
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

import psutil

from bench.record import record
from em_platform.dev import DaskPool
from em_platform.quiet_dask import QUIET_DASK_ENV


def _pool_cpu_while_idle(dask_env: dict[str, str], seconds: float) -> float:
    """CPU seconds the pool's processes spend over ``seconds`` once every worker is up."""
    from distributed import Client

    pool = DaskPool.start(io.StringIO(), dask_env)
    try:
        with Client(pool.address, timeout="60s", security=pool.security()) as client:
            client.wait_for_workers(os.cpu_count() or 1, timeout=120)
        time.sleep(5)  # the client's goodbye and the workers' first heartbeats settle
        procs = [psutil.Process(s.proc.pid) for s in (pool.scheduler, pool.workers)]
        procs += [c for p in procs for c in p.children(recursive=True)]

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in procs)

        before = cpu()
        time.sleep(seconds)  # the measurement itself: idle time is what is measured
        return cpu() - before
    finally:
        pool.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    if any(k.startswith("DASK_") for k in os.environ):
        print(
            "unset the DASK_* variables first: the pool's own settings are what is compared", file=sys.stderr
        )
        return 2
    runs: dict[str, list[float]] = {"defaults": [], "quiet": []}
    for _ in range(args.rounds):
        runs["defaults"].append(_pool_cpu_while_idle({}, args.seconds))
        runs["quiet"].append(_pool_cpu_while_idle(QUIET_DASK_ENV, args.seconds))
    per_s = {k: 1000 * statistics.median(v) / args.seconds for k, v in runs.items()}
    record(
        "dask_idle",
        {
            "pool": f"make dev's: a scheduler + {os.cpu_count()} single-thread worker processes, loopback",
            "idle_seconds": args.seconds,
            "rounds": args.rounds,
            "cpu_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "defaults_cpu_ms_per_s": round(per_s["defaults"], 1),
            "quiet_cpu_ms_per_s": round(per_s["quiet"], 1),
            "defaults_over_quiet": round(per_s["defaults"] / per_s["quiet"], 1) if per_s["quiet"] else None,
            "quiet_settings": QUIET_DASK_ENV,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
