"""Fault recovery on the process topology: the scenarios of tests/deploy/faults.py (the daemon, a Dask
worker, a run's process, the listener and the object store each killed with SIGKILL mid-ingest or
mid-montage), timed, with the items each lost or duplicated (both must be 0).

The baseline, measured in the same run on the same topology: the same work undisturbed (one inbox entry of
the size the run and object-store faults use, one montage as the dask-worker and listener faults acquire);
``vs_undisturbed`` is a fault's recovery time over that work's undisturbed time.

    python -m bench.bench_faults            # writes bench/results/faults.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "faults.json"
INSTANCE_NOTE = (
    "the deploy tests' tuning (tests/deploy/conftest.py: sensors every 1 s, run queue 1 s, run monitoring 2 s); "
    "docker/dagster.yaml polls run monitoring every 15 s, which adds up to ~13 s to the run fault"
)


def _undisturbed(topology, api) -> dict[str, float]:
    from tests.deploy.conftest import acquire, drop_into_inbox
    from tests.support.outcomes import wait_partition_started, wait_partitions_done

    name = f"baseline_{uuid.uuid4().hex[:6]}.ome.tif"
    drop_into_inbox(topology, name, seed=30, shape=(32, 512, 512))
    wait_partition_started(api, name)
    t0 = time.monotonic()
    ingest = wait_partitions_done(api, [name]) - t0
    t0 = time.monotonic()
    acquire(topology, api, "--rate", "3", rows=3, columns=4)
    return {"ingest": round(ingest, 2), "montage": round(time.monotonic() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from em_platform.deploy.processes import Machine, ProcessTopology
    from tests.deploy.conftest import TEST_INSTANCE, TEST_SETTINGS
    from tests.deploy.dagster_api import DagsterApi
    from tests.deploy.faults import FAULTS, run

    load = list(os.getloadavg())
    topology = ProcessTopology(
        Path(tempfile.mkdtemp(prefix="bench-faults-")),
        name=f"em_bench_{uuid.uuid4().hex[:8]}",
        workers=2,
        worker_threads=1,
        settings=TEST_SETTINGS,
        dagster_overrides=TEST_INSTANCE,
        machine=Machine(),
        drop_on_stop=True,
    )
    began = time.monotonic()
    topology.start()
    try:
        api = DagsterApi(topology.webserver)
        baseline = _undisturbed(topology, api)
        results = []
        for fault in FAULTS:
            r = run(fault, topology, api).doc()
            r["vs_undisturbed"] = round(r["recovery_s"] / baseline[r["during"]], 2)
            print(
                f"{fault:>13} during {r['during']}: back in {r['service_back_s']:.1f} s, every item complete "
                f"{r['recovery_s']:.1f} s after the kill ({r['vs_undisturbed']}x the undisturbed work); "
                f"lost {r['lost']}, duplicated {r['duplicated']}",
                flush=True,
            )
            results.append(r)
    finally:
        topology.stop()
    doc = {
        "what": "SIGKILL of one service while an ingest or a montage runs on the process topology "
        "(tests/deploy/faults.py); recovery_s: from the kill until every item is complete",
        "instance": INSTANCE_NOTE,
        "undisturbed_s": baseline,
        "faults": results,
        "all_exactly_once": all(r["lost"] == 0 and r["duplicated"] == 0 for r in results),
        "wall_s": round(time.monotonic() - began, 1),
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": load,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if doc["all_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
