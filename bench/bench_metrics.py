"""What the metrics cost the live chain (issue 52: at most 2 % of its CPU per tile), side by side in one run.

The baseline is the chain's own CPU per tile on 5000² tiles here (read, flatfield, CLAHE, statistics, focus,
the edge strips, and matching against the neighbour before it: bench_tiles' tasks). Beside it, the metrics'
CPU per tile: the live-QC service's counters and latency histogram as its verdicts go out
(:func:`em_platform.metrics.live.count_verdicts`), the listener's counter as a tile is journaled, and a
scrape of the service's /metrics every 15 s shared among the tiles of that interval (two scopes at TilEM's
3.07 tiles/s each). Records bench/results/metrics_cost.json with a history.

python -m bench.bench_metrics [--tiles 6] [--size 5000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.record import RESULTS, history_stamp

NAME = "metrics_cost"
LIMIT = 0.02  # of the chain's CPU per tile
SCRAPE_INTERVAL_S = 15.0
TILES_PER_S = 2 * 3.07  # two scopes at TilEM's rate


def chain_cpu_ms(tiles: int, size: int) -> float:
    """The chain's CPU per tile (thread time, one thread: what a tile costs whichever core runs it)."""
    from bench.bench_tiles import _limit_threads, match_task, process_task, write_montage
    from em_platform.tem.tile_processing import Flatfield

    _limit_threads()
    overlap = size // 10
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        montage = write_montage(Path(tmp), tiles, tiles, size, overlap)
        flatfield = Flatfield.from_references(montage["bright"], montage["dark"])
        process_task(montage["tiles"][0]["path"], flatfield, overlap, overlap // 3)  # warm: kernels, caches
        started, before = time.thread_time(), None
        for t in montage["tiles"]:
            own = process_task(t["path"], flatfield, overlap, overlap // 3)
            match_task(own, None, before["strips"]["right"] if before else None, overlap, overlap // 3)
            before = own
        return 1000 * (time.thread_time() - started) / tiles


def metrics_cpu_ms(repeats: int = 20_000) -> dict[str, float]:
    """The metrics' CPU per tile, by where it is spent."""
    from prometheus_client import REGISTRY, generate_latest

    from em_platform.metrics.catalogue import TILES_RECEIVED
    from em_platform.metrics.live import count_verdicts
    from em_platform.metrics.scopes import scope_of

    shares = ("/mnt/scopes/temca2", "/mnt/scopes/temca3")
    records = [
        SimpleNamespace(
            tile=SimpleNamespace(path=f"{shares[i % 2]}/m-{i // 5000}/tile_{i:06d}.tiff"),
            verdict=SimpleNamespace(passed=i % 17 != 0),
            error=None,
            times={"landed": 1000.0 + i, "verdict": 1000.3 + i},
        )
        for i in range(repeats)
    ]
    started = time.thread_time()
    for i in range(0, repeats, 3):  # the service commits verdicts a few at a time
        count_verdicts(records[i : i + 3], shares)
    verdicts = (time.thread_time() - started) / repeats
    started = time.thread_time()
    for r in records:
        TILES_RECEIVED.labels(scope_of(r.tile.path, shares)).inc()
    received = (time.thread_time() - started) / repeats
    started = time.thread_time()
    for _ in range(200):
        generate_latest(REGISTRY)
    scrape = (time.thread_time() - started) / 200 / (SCRAPE_INTERVAL_S * TILES_PER_S)
    return {
        "verdicts": round(1000 * verdicts, 5),
        "tile_received": round(1000 * received, 5),
        "scrape": round(1000 * scrape, 5),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=6)
    ap.add_argument("--size", type=int, default=5000)
    args = ap.parse_args(argv)
    chain = chain_cpu_ms(args.tiles, args.size)
    metrics = metrics_cpu_ms()
    total = sum(metrics.values())
    run = {
        **history_stamp(),
        "tiles": args.tiles,
        "size": args.size,
        "chain_cpu_ms_per_tile": round(chain, 1),
        "metrics_cpu_ms_per_tile": metrics,
        "metrics_over_chain": round(total / chain, 6),
        "limit": LIMIT,
    }
    run["meets"] = run["metrics_over_chain"] <= LIMIT
    path = RESULTS / f"{NAME}.json"
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    doc = {"benchmark": NAME, "date": run["measured"], "latest": run, "history": [*history, run]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(run, indent=1))
    return run


if __name__ == "__main__":
    main()
