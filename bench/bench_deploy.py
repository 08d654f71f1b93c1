"""Benchmark: the production topology (as processes) against the embedded default, end to end.

1. **Inbox drop → complete record**, the same small OME-TIFF dropped several times (a new name each time):
   on the process topology (`make deploy-local`: daemon, code server, PostgreSQL, 2 Dask workers, S3) and on
   the embedded default (`make dev`: `dagster dev`, SQLite, a LocalCluster inside the run, a local folder).
   Where the seconds go, from the run records: *sensor* (drop → the sensor's tick created the run; the inbox
   sensor's 15 s interval, the daemon's 5 s loop, the settle time), *launch* (queued → started: the run
   queue's dequeue interval, a new Python process importing Dagster and em_platform), *run* (started →
   ended; inside it the *Dask hop*: on the topology the span of the run's tasks on the workers, from the
   scheduler's task stream) and *record* (drop → the catalog record is complete).
2. **Tile throughput of a montage run**: the same simulated montage processed by ``run_montage`` (what
   ``montage_job`` runs) on the topology's 2 single-threaded Dask workers against the embedded default's
   ``LocalCluster`` (one worker, a thread per core, in process).

Both deployments run the production intervals (nothing tuned for speed). The machine is shared: the load
average and the CPU seconds the deployment's processes used are recorded with the wall times.

    python -m bench.bench_deploy                 # writes bench/results/deploy.json
    python -m bench.bench_deploy --drops 1 --rows 2 --columns 2   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "deploy.json"
SETTLE = "1"  # seconds an inbox entry must be quiet; the same in both deployments


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- 1. inbox drop to complete record ---------------------------------------------------------------


def _drop(inbox: Path, name: str, seed: int) -> float:
    from em_platform.samples import em_texture, write_ome_tiff

    vol = em_texture((8, 512, 512), seed=seed, dtype=np.uint16)
    staging = inbox.parent / f".{name}"
    write_ome_tiff(staging, vol, {"z": 40.0, "y": 4.0, "x": 4.0})
    os.replace(staging, inbox / name)
    return time.time()


def _wait_complete(catalog_url: str, name: str, timeout: float = 600) -> float:
    from em_platform.catalog.db import CatalogDB

    db = CatalogDB(catalog_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rec = db.find("local", name)
            if rec is not None and rec["status"] in ("complete", "failed"):
                if rec["status"] != "complete":
                    raise RuntimeError(f"{name}: record {rec['status']}: {rec.get('error')}")
                return time.time()
            time.sleep(0.2)
    finally:
        db.dispose()
    raise TimeoutError(f"{name}: no complete record within {timeout} s")


def _phases(api, name: str, dropped: float, complete: float, task_stream=None) -> dict[str, float]:
    [run] = api.query(
        """query R($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results {
             status creationTime startTime endTime } } } }""",
        {"f": {"tags": [{"key": "dagster/partition", "value": name}]}},
    )["runsOrError"]["results"]
    if run["status"] != "SUCCESS":
        raise RuntimeError(f"{name}: run {run['status']}")
    out = {
        "sensor_s": run["creationTime"] - dropped,
        "launch_s": run["startTime"] - run["creationTime"],
        "run_s": run["endTime"] - run["startTime"],
        "drop_to_record_s": complete - dropped,
    }
    if task_stream is not None:
        tasks = [t for t in task_stream if run["startTime"] <= t["startstops"][0]["start"] <= run["endTime"]]
        if tasks:
            first = min(t["startstops"][0]["start"] for t in tasks)
            last = max(t["startstops"][-1]["stop"] for t in tasks)
            out["dask_tasks"] = len(tasks)
            out["dask_span_s"] = last - first
            out["dask_busy_s"] = sum(s["stop"] - s["start"] for t in tasks for s in t["startstops"])
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def bench_topology_drops(drops: int, work: Path) -> dict[str, Any]:
    from distributed import Client

    from em_platform.deploy.processes import ProcessTopology
    from tests.deploy.dagster_api import DagsterApi

    cpu0, t0 = _children_cpu(), time.monotonic()
    topo = ProcessTopology(
        work / "topology",
        name=f"em_bench_{uuid.uuid4().hex[:8]}",
        settings={"EM_INBOX_SETTLE_SECONDS": SETTLE},
        drop_on_stop=True,
    )
    try:
        topo.start()
        startup = time.monotonic() - t0
        api = DagsterApi(topo.webserver)
        inbox = Path(topo.platform_env["EM_INBOX"])
        samples = []
        with Client(topo.scheduler, timeout="30s", security=topo.dask_security()) as client:
            client.get_task_stream()
            for i in range(drops):
                name = f"bench_{i}_{uuid.uuid4().hex[:6]}.ome.tif"
                dropped = _drop(inbox, name, seed=i)
                complete = _wait_complete(topo.catalog_url, name)
                time.sleep(1.0)  # the run's end event follows the record by a moment
                samples.append(_phases(api, name, dropped, complete, client.get_task_stream(start=dropped)))
                print(f"  topology drop {i}: {samples[-1]}", flush=True)
    finally:
        topo.stop()
    return {"startup_s": round(startup, 1), "cpu_s": round(_children_cpu() - cpu0, 1), "drops": samples}


def bench_embedded_drops(drops: int, work: Path) -> dict[str, Any]:
    from em_platform.deploy.processes import free_port
    from tests.deploy.dagster_api import DagsterApi, wait_until

    home, data = work / "embedded" / "dagster_home", work / "embedded" / "data"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    (data / "inbox").mkdir(parents=True)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EM_", "DASK_", "DAGSTER_"))},
        "DAGSTER_HOME": str(home),
        "EM_DATA_ROOT": str(data),
        "EM_INBOX_SETTLE_SECONDS": SETTLE,
    }
    cpu0, t0 = _children_cpu(), time.monotonic()
    log = open(work / "embedded" / "dagster-dev.log", "wb")
    dev = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = DagsterApi(f"http://127.0.0.1:{port}")
    try:

        def loaded():
            try:
                entries = api.query(
                    "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
                )
            except OSError:
                return False
            return all(e["loadStatus"] == "LOADED" for e in entries["workspaceOrError"]["locationEntries"])

        wait_until(loaded, 300, "dagster dev to load the code location")
        startup = time.monotonic() - t0
        catalog_url = f"sqlite:///{data / 'catalog.sqlite'}"
        samples = []
        for i in range(drops):
            name = f"bench_{i}_{uuid.uuid4().hex[:6]}.ome.tif"
            dropped = _drop(data / "inbox", name, seed=i)
            complete = _wait_complete(catalog_url, name)
            time.sleep(1.0)
            samples.append(_phases(api, name, dropped, complete))
            print(f"  embedded drop {i}: {samples[-1]}", flush=True)
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # dagster dev stops its children on SIGINT
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(10)
        log.close()
    return {"startup_s": round(startup, 1), "cpu_s": round(_children_cpu() - cpu0, 1), "drops": samples}


# -- 2. montage tile throughput ---------------------------------------------------------------------


def _montage_throughput(client, work: Path, label: str, rows: int, columns: int, tile_size: int) -> dict:
    from em_platform.resources.acquisition import SimulatedScope
    from em_platform.simulation.scope import simulate_montage
    from em_platform.simulation.scope_config import ScopeConfig
    from em_platform.tem.journal import Journal
    from em_platform.tem.montage_run import MontageRunConfig, run_montage

    url = f"sqlite:///{work / f'journal_{label}.sqlite'}"
    journal = Journal(url)
    cfg = ScopeConfig(rows=rows, columns=columns, tile_size=tile_size, overlap=0.1, seed=7)
    truth = simulate_montage(cfg, work / f"tiles_{label}", journal.record, sleep=lambda s: None)
    journal.dispose()
    source = SimulatedScope(journal_url=url, tile_shares=[str(work / f"tiles_{label}")]).tile_source()
    began, cpu0 = time.monotonic(), time.process_time()
    try:
        result = run_montage(
            truth.montage_id,
            source,
            client,
            processed_url=str(work / f"processed_{label}.zarr"),
            config=MontageRunConfig(stall_timeout_seconds=60),
        )
    finally:
        source.close()
    seconds = time.monotonic() - began
    tiles = len(result.tiles)
    failed = sum(1 for r in result.tiles.values() if r.error)
    return {
        "tiles": tiles,
        "failed": failed,
        "tile_px": tile_size,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(tiles / seconds, 2),
        "mpix_per_s": round(tiles * tile_size**2 / seconds / 1e6, 1),
        "client_process_cpu_s": round(time.process_time() - cpu0, 1),
    }


def bench_montage(work: Path, rows: int, columns: int, tile_size: int) -> dict[str, Any]:
    from distributed import Client

    from em_platform.deploy.processes import ProcessTopology
    from em_platform.resources.dask import DaskResource

    out: dict[str, Any] = {}
    # the embedded default: what DaskResource() builds when no scheduler address is set
    local = DaskResource()
    client = local.get_client()
    try:
        _montage_throughput(client, work, "warm_local", 1, 2, tile_size)  # imports, first-task costs
        out["local_cluster"] = _montage_throughput(client, work, "local", rows, columns, tile_size)
        out["local_cluster"]["workers"] = "1 worker, threads=cores, in process"
    finally:
        local.teardown_after_execution(None)
    topo = ProcessTopology(work / "topology_dask", name=f"em_bench_{uuid.uuid4().hex[:8]}", drop_on_stop=True)
    try:
        # only the Dask part of the topology is needed here; the runner starts it all, in order
        topo.start()
        with Client(topo.scheduler, timeout="30s", security=topo.dask_security()) as client:
            _montage_throughput(client, work, "warm_cluster", 1, 2, tile_size)
            out["dask_cluster"] = _montage_throughput(client, work, "cluster", rows, columns, tile_size)
            out["dask_cluster"]["workers"] = "2 `dask worker` processes x 1 thread (compose: DASK_WORKERS=2)"
    finally:
        topo.stop()
    out["cluster_over_local"] = round(
        out["dask_cluster"]["tiles_per_s"] / out["local_cluster"]["tiles_per_s"], 2
    )
    return out


def _summary(samples: list[dict]) -> dict[str, float]:
    keys = [k for k in samples[0] if isinstance(samples[0][k], int | float)]
    return {k: round(statistics.median(s[k] for s in samples if k in s), 2) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=3, help="inbox drops per deployment (default 3)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # tests.deploy.dagster_api (the GraphQL helper)
    results: dict[str, Any] = {
        "benchmark": "deploy",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "load_before": _load()},
    }
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        work = Path(tmp)
        print("inbox drop -> complete record, process topology ...", flush=True)
        topo = bench_topology_drops(args.drops, work)
        print("inbox drop -> complete record, embedded default (dagster dev) ...", flush=True)
        embedded = bench_embedded_drops(args.drops, work)
        print("montage tile throughput: 2-worker cluster vs LocalCluster ...", flush=True)
        montage = bench_montage(work, args.rows, args.columns, args.tile_size)
    topo["median"], embedded["median"] = _summary(topo["drops"]), _summary(embedded["drops"])
    results["inbox_drop_to_record"] = {
        "topology": topo,
        "embedded_default": embedded,
        "topology_over_embedded": round(
            topo["median"]["drop_to_record_s"] / embedded["median"]["drop_to_record_s"], 2
        ),
        "note": "same intervals in both (inbox sensor 15 s, daemon loop 5 s, dequeue 2 s, settle 1 s)",
    }
    results["montage_tile_throughput"] = montage
    results["machine"]["load_after"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'phase (median s)':<22}{'topology':>10}{'embedded':>10}")
    for key in ("sensor_s", "launch_s", "run_s", "drop_to_record_s"):
        print(f"{key:<22}{topo['median'][key]:>10}{embedded['median'][key]:>10}")
    if "dask_span_s" in topo["median"]:
        print(f"{'dask_span_s (in run)':<22}{topo['median']['dask_span_s']:>10}{'-':>10}")
    lc, dc = montage["local_cluster"], montage["dask_cluster"]
    print(
        f"\nmontage tiles/s: LocalCluster {lc['tiles_per_s']}, 2-worker cluster {dc['tiles_per_s']} "
        f"(x{montage['cluster_over_local']}); load {results['machine']['load_before']} -> {results['machine']['load_after']}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
