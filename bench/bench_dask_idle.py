"""What a Dask pool costs doing nothing: Dask's defaults against em_platform.quiet_dask's settings.

`make dev` and the deployment keep a scheduler and its workers up all day, waiting for runs. This starts one
the way they do (`dask scheduler` + `dask worker --nworkers 2 --nthreads 1`, loopback, no dashboard), lets it
settle, and counts the CPU time of all its processes (scheduler, worker parent, nannies' workers) over
``--seconds`` of idling; once with Dask's defaults, once with ``QUIET_DASK_ENV``, alternating ``--rounds``
times. The ratio is what the quiet settings save; results in bench/results/dask_idle.json.

    python -m bench.bench_dask_idle              # 2 rounds of 30 s each way
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from em_platform.deploy.processes import free_port
from em_platform.quiet_dask import QUIET_DASK_ENV

OUT = Path(__file__).resolve().parent / "results" / "dask_idle.json"


def _pool_cpu_while_idle(env: dict[str, str], seconds: float) -> float:
    """CPU seconds a scheduler and two single-thread workers spend over ``seconds`` once they are up."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    common = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    started = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            + common,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        started.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nworkers",
                    "2",
                    "--nthreads",
                    "1",
                ]
                + ["--host", "127.0.0.1", *common],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        time.sleep(5)  # the client's goodbye and the workers' first heartbeats settle
        procs = [psutil.Process(p.pid) for p in started]
        procs += [c for p in procs for c in p.children(recursive=True)]

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in procs)

        before = cpu()
        time.sleep(seconds)  # the measurement itself: idle time is what is measured
        return cpu() - before
    finally:
        for p in reversed(started):
            p.terminate()
        for p in started:
            p.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    plain = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    runs: dict[str, list[float]] = {"defaults": [], "quiet": []}
    for _ in range(args.rounds):
        runs["defaults"].append(_pool_cpu_while_idle(plain, args.seconds))
        runs["quiet"].append(_pool_cpu_while_idle({**plain, **QUIET_DASK_ENV}, args.seconds))
    per_s = {k: 1000 * statistics.median(v) / args.seconds for k, v in runs.items()}
    result = {
        "pool": "dask scheduler + dask worker --nworkers 2 --nthreads 1, loopback, no dashboard",
        "idle_seconds": args.seconds,
        "rounds": args.rounds,
        "cpu_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "defaults_cpu_ms_per_s": round(per_s["defaults"], 1),
        "quiet_cpu_ms_per_s": round(per_s["quiet"], 1),
        "defaults_over_quiet": round(per_s["defaults"] / per_s["quiet"], 1) if per_s["quiet"] else None,
        "quiet_settings": QUIET_DASK_ENV,
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
