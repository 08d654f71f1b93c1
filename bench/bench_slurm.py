"""What the SLURM path costs over the local cluster on the same work (issue 37).

Starts a real single-node SLURM here (tests/support/slurm.py: munged, slurmctld, slurmd of its own), then runs
the same simulated montage through Dagster's montage job with the local cluster (the default) and with
``EM_COMPUTE=slurm`` (each worker a batch job), alternating ``--rounds`` times. Also measured apart: the time
from asking for a worker to its joining (sbatch, SLURM's scheduling, the job's Python starting em_platform's
worker), and the round trip of a small task through each scheduler. Results in bench/results/slurm.json.

    python -m bench.bench_slurm                 # 2 rounds of a 3 × 4 montage
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.record import record


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """``env`` set in this process (the Dask resource reads EM_SLURM_* and SLURM_CONF there), then undone."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _montage_run(folder: Path, cfg, env: dict[str, str]) -> float:
    """Seconds of the montage job for a montage whose tiles are all there."""
    import dagster as dg

    from em_platform.simulation.scope import simulate_montage
    from em_platform.tem.journal import Journal
    from tests.support.platform import make_platform

    with _environ(env):
        platform = make_platform(folder, extra_env=env)
        journal = Journal(platform.settings.catalog_url)
        simulate_montage(cfg, folder / "tiles", journal.record, sleep=lambda s: None, montage_id="bench")
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("montages", ["bench"])
            began = time.perf_counter()
            result = platform.defs.resolve_job_def("montage_job").execute_in_process(
                instance=instance,
                partition_key="bench",
                run_config={"ops": {"montage_tiles": {"config": {"poll_seconds": 0.05}}}},
            )
            took = time.perf_counter() - began
        assert result.success
        return took


def _round_trips(client, n: int = 200) -> float:
    """Median milliseconds of one tiny task submitted and gathered, one after another."""

    def inc(x: int) -> int:
        return x + 1

    times = []
    for i in range(n):
        began = time.perf_counter()
        client.submit(inc, i, pure=False).result()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def _scheduler_costs(env: dict[str, str]) -> dict[str, float]:
    """The first worker's start and a task's round trip, local cluster against SLURM jobs."""
    from em_platform.resources import DaskResource

    out = {}
    with _environ(env):
        for where, resource in (
            ("local", DaskResource(n_workers=1, threads_per_worker=1)),
            ("slurm", DaskResource(compute="slurm")),
        ):
            began = time.perf_counter()
            client = resource.get_client()
            client.wait_for_workers(1, timeout=120)
            out[f"{where}_first_worker_s"] = round(time.perf_counter() - began, 2)
            out[f"{where}_task_round_trip_ms"] = round(_round_trips(client), 2)
            resource.teardown_after_execution(None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--columns", type=int, default=4)
    args = ap.parse_args(argv)
    from em_platform.simulation.scope_config import ScopeConfig
    from tests.support.slurm import LocalSlurm, is_available

    ok, reason = is_available()
    if not ok:
        print(f"bench_slurm needs a SLURM here: {reason}", file=sys.stderr)
        return 2
    cfg = ScopeConfig(rows=args.rows, columns=args.columns, overlap=0.15, jitter_px=6.0, seed=3)
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp, LocalSlurm(Path(tmp) / "slurm") as slurm:
        env = {
            **slurm.env,
            "EM_SLURM_QUEUE": slurm.partition,
            "EM_SLURM_CORES": "1",
            "EM_SLURM_MEMORY": "2GB",
            "EM_SLURM_MIN_JOBS": "1",
            "EM_SLURM_MAX_JOBS": str(os.cpu_count() or 1),
            "EM_SLURM_START_TIMEOUT": "120",
        }
        costs = _scheduler_costs(env)
        runs: dict[str, list[float]] = {"local": [], "slurm": []}
        for r in range(args.rounds):
            for where in ("local", "slurm"):
                extra = {**env, "EM_COMPUTE": "slurm"} if where == "slurm" else {}
                took = _montage_run(Path(tmp) / f"{where}{r}", cfg, extra)
                runs[where].append(round(took, 2))
                print(f"round {r + 1}: {where} {took:.1f} s", flush=True)
        local, on_slurm = statistics.median(runs["local"]), statistics.median(runs["slurm"])
        record(
            "slurm",
            {
                "work": f"montage_job, {args.rows} x {args.columns} simulated tiles ({cfg.tile_size} px)",
                "local_cluster_s": runs["local"],
                "slurm_jobs_s": runs["slurm"],
                "slurm_over_local": round(on_slurm / local, 2),
                "slurm_overhead_s": round(on_slurm - local, 2),
                **costs,
                "slurm_started_in_s": round(slurm.started_in or 0.0, 2),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
