"""Benchmark: the live TEM per-tile chain on 5000² uint8 camera tiles, 2 cores, against a naive baseline.

The chain is what TEM_graph does to every tile (docs/seed-systems.md §1.2), as implemented in
:mod:`em_platform.tem.tile_processing` and :mod:`em_platform.stitch.matching`:

    read the raw TIFF → flatfield → CLAHE (clip 2, 16×16) → min/max/mean/std + 256-bin histogram
    → focus score → match against the top and left neighbours

A synthetic montage is written first: a periodic EM-like specimen (smoothed noise, membranes, dark
granules) cut into a raster of overlapping 5000² tiles (10 % overlap, ±20 px stage jitter), with lens
vignetting (30 % to the corners), a dark offset and shot noise, saved as uncompressed uint8 TIFFs
(the camera's format), plus brightfield/darkfield references. Tiles are read from disk (just written,
so from the page cache, as in live acquisition where the camera has just saved them).

Pixels run on Dask, as the platform runs pixel work, on 2 cores in two ways (``--executors``):
``threads``, one worker with 2 threads (the platform's embedded default; OpenCV and numpy release the
GIL), and ``processes``, 2 single-threaded worker processes (like ``dask-worker`` containers). OpenCV's
own thread pool is limited to 1 thread. The faster one is the headline (``em_platform`` in the JSON).
Per tile there are three kinds of task: *process* (read → histogram/focus, returning the statistics
and the four edge strips), *strip* (picks the bottom/right strip a later neighbour needs) and *match*
(this tile's top and left strips against the neighbours' bottom and right strips), so only 2.8 MB
strips, never whole tiles, travel between workers.

Dask worker processes run with ``MALLOC_TRIM_THRESHOLD_=65536`` (Dask's default), which makes glibc
hand every large buffer back to the OS: each 25 MB array then costs ~6,000 page faults. That is why
the process executor is slower per tile here; ``MALLOC_MMAP_THRESHOLD_=134217728`` in the workers'
environment removes the difference (measured: 3.9 → 4.8 tiles/s on 20 tiles).

* **throughput**: all tiles submitted at once; tiles/s and MPix/s over the wall time (after a warm-up);
* **paced latency**: tiles arrive at the Allen scope's rate (3.1 tiles/s) and the latency from arrival
  to the tile's last match is recorded (p50/p95), along with the chain's compute time per tile;
* **naive**: the same chain written straightforwardly, single-threaded, in this process: numpy float64
  flatfield, scikit-image ``equalize_adapthist`` (kernel 1/16 of the tile, its default clip 0.01: the
  same method, not bit-identical to OpenCV's), numpy min/max/mean/std and ``np.histogram``, the same
  numpy-FFT focus score, ``skimage.registration.phase_cross_correlation`` (upsample 10) on the full
  overlap strips. It runs on a 2×2 block of the montage by default (``--naive-tiles``), as it is slow.

    python -m bench.bench_tiles                   # 36 tiles, prints a table, writes bench/results/tiles.json
    python -m bench.bench_tiles --tiles 8 --naive-tiles 2 --size 2000   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "tiles.json"
ALLEN_RATE = 3.1  # tiles/s of one Allen scope (2,772 tiles in 902 s), performance-anchors §1.1
LATENCY_TARGET_S = 1.0


# ----------------------------------------------------------------------------------------------------
# The synthetic montage


def _periodic_blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a periodic field (wrap padding, so the result is periodic too)."""
    import cv2

    pad = int(math.ceil(4 * sigma)) + 1
    padded = np.pad(field, pad, mode="wrap")
    return cv2.GaussianBlur(padded, (0, 0), sigma)[pad:-pad, pad:-pad]


def periodic_specimen(period: int, seed: int = 0) -> np.ndarray:
    """A ``period``² float32 EM-like specimen image (mean about 140 grey levels) that tiles the plane."""
    import cv2

    rng = np.random.default_rng(seed)

    def smooth(sigma: float) -> np.ndarray:
        a = _periodic_blur(rng.standard_normal((period, period), dtype=np.float32), sigma)
        return a / a.std()

    texture = 0.4 * smooth(1.5) + 0.6 * smooth(6.0)
    f = smooth(14.0)
    pad = 2
    fp = np.pad(f, pad, mode="wrap")
    gx = cv2.Sobel(fp, cv2.CV_32F, 1, 0, ksize=3)[pad:-pad, pad:-pad] / 8
    gy = cv2.Sobel(fp, cv2.CV_32F, 0, 1, ksize=3)[pad:-pad, pad:-pad] / 8
    distance = np.abs(f) / np.maximum(np.hypot(gx, gy), 1e-3)  # ≈ px to the nearest zero line
    membranes = np.exp(-0.5 * (distance / 1.2) ** 2)
    granules = np.clip(smooth(4.0) - 2.2, 0, None)
    return (140 + 18 * texture - 70 * membranes - 60 * granules).astype(np.float32)


def vignetting(size: int, falloff: float = 0.3) -> np.ndarray:
    """Lens/beam vignetting: 1 at the centre, 1 − falloff in the corners (radially quadratic)."""
    c = (size - 1) / 2
    y, x = np.ogrid[:size, :size]
    r2 = ((x - c) ** 2 + (y - c) ** 2) / (2 * c * c)
    return (1 - falloff * r2).astype(np.float32)


def write_montage(
    workdir: Path, n_tiles: int, columns: int, size: int, overlap: int, seed: int = 0
) -> dict[str, Any]:
    """Write ``n_tiles`` raw uint8 TIFF tiles in raster order plus the flatfield references."""
    import tifffile

    rng = np.random.default_rng(seed)
    period = int(size * 1.23) // 16 * 16  # not a multiple of the tile step, so tiles differ
    specimen = periodic_specimen(period, seed)
    vig = vignetting(size)
    dark = (8 + 4 * np.linspace(0, 1, size, dtype=np.float32)[None, :]).repeat(size, 0)
    beam = 200.0 / 140.0  # specimen mean 140 → raw mean about 200 × transmission
    bright = dark + vig * 200.0
    tifffile.imwrite(workdir / "brightfield.tiff", bright.astype(np.float32))
    tifffile.imwrite(workdir / "darkfield.tiff", dark.astype(np.float32))
    step = size - overlap
    jitter = rng.integers(-20, 21, (n_tiles, 2))

    def write_tile(i: int) -> dict[str, Any]:
        r, c = divmod(i, columns)
        x0, y0 = c * step + int(jitter[i, 0]), r * step + int(jitter[i, 1])
        noise = np.random.default_rng((seed, i))
        rows = (y0 + np.arange(size)) % period
        cols = (x0 + np.arange(size)) % period
        signal = specimen[np.ix_(rows, cols)] * beam * vig * 0.7 + dark
        signal += np.sqrt(np.maximum(signal, 0)) * noise.standard_normal(
            signal.shape, dtype=np.float32
        )  # shot noise
        raw = np.clip(np.rint(signal), 0, 255).astype(np.uint8)
        path = workdir / f"tile_r{r:02d}_c{c:02d}.tiff"
        tifffile.imwrite(path, raw)
        return {"index": i, "row": r, "column": c, "path": str(path), "x": x0, "y": y0}

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy releases the GIL: generation on all cores
        tiles = list(pool.map(write_tile, range(n_tiles)))
    return {"tiles": tiles, "bright": bright, "dark": dark}


def neighbours(tiles: list[dict[str, Any]], columns: int) -> dict[int, dict[str, int]]:
    """Raster index → {"top": index, "left": index} of the neighbours acquired before it."""
    out = {}
    for t in tiles:
        i, r, c = t["index"], t["row"], t["column"]
        n = {}
        if r > 0:
            n["top"] = i - columns
        if c > 0:
            n["left"] = i - 1
        out[i] = n
    return out


def true_offset(
    tile: dict[str, Any], neighbour: dict[str, Any], position: str, size: int, overlap: int
) -> tuple[float, float]:
    from em_platform.stitch.grid import to_nominal

    dx, dy = tile["x"] - neighbour["x"], tile["y"] - neighbour["y"]
    return to_nominal(dx, dy, (size, size), overlap, position)


# ----------------------------------------------------------------------------------------------------
# The chain as Dask tasks (module-level functions: picklable by reference)


def _limit_threads() -> None:
    import cv2

    cv2.setNumThreads(1)


def process_task(path: str, flatfield: Any, overlap: int, max_shift: int) -> dict[str, Any]:
    """read → flatfield → CLAHE → statistics → focus; returns the results and the four edge strips."""
    from em_platform.stitch.matching import edge_strip
    from em_platform.tem.tile_processing import process_tile, read_tile

    t0 = time.perf_counter()
    tile = process_tile(read_tile(path), flatfield)
    strips = {
        side: edge_strip(tile.image, side, overlap, max_shift) for side in ("top", "left", "bottom", "right")
    }
    return {"stats": tile.stats, "focus": tile.focus, "strips": strips, "seconds": time.perf_counter() - t0}


def strip_of(processed: dict[str, Any], side: str) -> Any:
    """One edge strip of a processed tile (a task of its own, so that a neighbour's match task fetches
    2.8 MB, not the whole result)."""
    return processed["strips"][side]


def match_task(
    own: dict[str, Any], top: Any | None, left: Any | None, overlap: int, max_shift: int
) -> dict[str, Any]:
    """Match a processed tile's top and left strips against its neighbours' bottom and right strips."""
    from em_platform.stitch.matching import match_neighbour

    t0 = time.perf_counter()
    matches = {}
    for position, strip in (("top", top), ("left", left)):
        if strip is not None:
            m = match_neighbour(own["strips"][position], strip, position, overlap, max_shift_px=max_shift)
            matches[position] = None if m is None else (m.dX, m.dY, m.quality)
    return {
        "focus": own["focus"],
        "mean": own["stats"]["mean_float"],
        "matches": matches,
        "process_s": own["seconds"],
        "match_s": time.perf_counter() - t0,
        "seconds": own["seconds"] + time.perf_counter() - t0,
        "finished": time.time(),
    }


def submit_tile(
    client: Any,
    tile: dict[str, Any],
    nbs: dict[str, int],
    submitted: dict[int, dict[str, Any]],
    ff: Any,
    overlap: int,
    shift: int,
    phase: str,
) -> Any:
    """Submit one tile's process task, its bottom/right strip tasks and its match task. Keys are unique
    per ``phase``: a key still known to the scheduler would return the earlier phase's result."""
    i = tile["index"]
    p = client.submit(process_task, tile["path"], ff, overlap, shift, key=f"{phase}-process-{i}", pure=False)
    submitted[i] = {
        side: client.submit(strip_of, p, side, key=f"{phase}-{side}-{i}", pure=False)
        for side in ("bottom", "right")
    }
    top = submitted[nbs["top"]]["bottom"] if "top" in nbs else None
    left = submitted[nbs["left"]]["right"] if "left" in nbs else None
    return client.submit(match_task, p, top, left, overlap, shift, key=f"{phase}-match-{i}", pure=False)


def run_dask(
    montage: dict[str, Any], columns: int, size: int, overlap: int, cores: int, warmup: int, processes: bool
) -> dict[str, Any]:
    """The chain on a LocalCluster of ``cores`` single-threaded worker processes (``processes``) or of
    one worker with ``cores`` threads (the platform's embedded default: cv2 and numpy release the GIL)."""
    import dask
    from dask.distributed import Client, LocalCluster, wait

    from em_platform.stitch.matching import default_max_shift
    from em_platform.tem.tile_processing import Flatfield

    tiles = montage["tiles"]
    nbs = neighbours(tiles, columns)
    shift = default_max_shift(overlap)
    flatfield = Flatfield.from_references(montage["bright"], montage["dark"])
    with (
        dask.config.set({"distributed.worker.daemon": False, "distributed.admin.tick.limit": "10s"}),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # "Port 8787 is already in use" and the like
        cluster = LocalCluster(
            n_workers=cores if processes else 1,
            threads_per_worker=1 if processes else cores,
            processes=processes,
            dashboard_address="127.0.0.1:0",
            memory_limit="8GiB",
        )
    client = Client(cluster)
    try:
        client.run(_limit_threads)
        t = time.perf_counter()
        ff = client.scatter(flatfield, broadcast=True)
        scatter_s = time.perf_counter() - t

        # warm-up: imports, first calls, caches (not counted)
        submitted: dict[int, Any] = {}
        wait(
            [
                submit_tile(client, tiles[i], {}, submitted, ff, overlap, shift, "warmup")
                for i in range(min(warmup, len(tiles)))
            ]
        )
        submitted.clear()

        # throughput: everything at once
        t = time.perf_counter()
        futures = [
            submit_tile(client, tile, nbs[tile["index"]], submitted, ff, overlap, shift, "burst")
            for tile in tiles
        ]
        results = client.gather(futures)
        wall = time.perf_counter() - t
        del futures
        submitted.clear()

        # paced: tiles land at the Allen rate; latency = last match done − arrival
        arrivals: dict[int, float] = {}
        done: dict[int, float] = {}
        lock = threading.Lock()
        paced = []
        t0 = time.time()
        for tile in tiles:
            due = t0 + tile["index"] / ALLEN_RATE
            time.sleep(max(0.0, due - time.time()))
            arrivals[tile["index"]] = time.time()
            f = submit_tile(client, tile, nbs[tile["index"]], submitted, ff, overlap, shift, "paced")

            def record(fut: Any, i: int = tile["index"]) -> None:
                with lock:
                    done.setdefault(i, time.time())

            f.add_done_callback(record)
            paced.append(f)
        paced_results = client.gather(paced)
        submitted.clear()
    finally:
        client.close()
        cluster.close()

    # the client's view (done callback) when it fired, else the worker's finish time (same clock)
    latencies = [done.get(i, r["finished"]) - arrivals[i] for i, r in enumerate(paced_results)]
    truth_ok = total = 0
    for tile, r in zip(tiles, results, strict=True):
        for position, m in r["matches"].items():
            total += 1
            tx, ty = true_offset(tile, tiles[nbs[tile["index"]][position]], position, size, overlap)
            truth_ok += m is not None and abs(m[0] - tx) <= 1 and abs(m[1] - ty) <= 1
    return {
        "wall_s": wall,
        "tiles_per_s": len(tiles) / wall,
        "chain_s": [r["seconds"] for r in results],
        "process_s": [r["process_s"] for r in results],
        "match_s": [r["match_s"] for r in results],
        "paced_chain_s": [r["seconds"] for r in paced_results],
        "paced_latency_s": latencies,
        "matches_correct": truth_ok,
        "matches_total": total,
        "focus": [r["focus"] for r in results],
        "flatfield_scatter_s": scatter_s,
        "max_shift_px": shift,
    }


# ----------------------------------------------------------------------------------------------------
# The naive single-threaded chain


def run_naive(montage: dict[str, Any], columns: int, block: int, size: int, overlap: int) -> dict[str, Any]:
    import tifffile
    from skimage.exposure import equalize_adapthist
    from skimage.registration import phase_cross_correlation
    from skimage.util import img_as_ubyte

    from em_platform.tem.tile_processing import focus_score

    bright, dark = montage["bright"].astype(np.float64), montage["dark"].astype(np.float64)
    chosen = [t for t in montage["tiles"] if t["row"] < block and t["column"] < block]
    done: dict[int, np.ndarray] = {}
    seconds = []
    correct = total = 0
    t_all = time.perf_counter()
    for tile in chosen:
        t0 = time.perf_counter()
        raw = tifffile.imread(tile["path"])
        response = bright - dark
        corrected = (raw - dark) / response * response.mean()
        corrected = np.clip(np.rint(corrected), 0, 255).astype(np.uint8)
        image = img_as_ubyte(
            equalize_adapthist(corrected, kernel_size=(size // 16, size // 16), clip_limit=0.01)
        )
        stats = {
            "min": int(image.min()),
            "max": int(image.max()),
            "mean": float(image.mean()),
            "std": float(image.std()),
        }
        stats["histogram"] = np.histogram(image, bins=256, range=(0, 256))[0].tolist()
        focus_score(image)
        i, r, c = tile["index"], tile["row"], tile["column"]
        for position, j in (("top", i - columns if r > 0 else None), ("left", i - 1 if c > 0 else None)):
            if j is None or j not in done:
                continue
            nb = done[j]
            if position == "top":
                own, other = image[:overlap].astype(np.float64), nb[size - overlap :].astype(np.float64)
            else:
                own, other = image[:, :overlap].astype(np.float64), nb[:, size - overlap :].astype(np.float64)
            shift = phase_cross_correlation(other, own, upsample_factor=10)[0]  # (dY, dX) of the tile
            tx, ty = true_offset(tile, montage["tiles"][j], position, size, overlap)
            total += 1
            correct += abs(shift[1] - tx) <= 1 and abs(shift[0] - ty) <= 1
        done[i] = image
        seconds.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    return {
        "wall_s": wall,
        "tiles": len(chosen),
        "tiles_per_s": len(chosen) / wall,
        "chain_s": seconds,
        "matches_correct": correct,
        "matches_total": total,
    }


# ----------------------------------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def opencv_clahe_ms(size: int = 5000, repeats: int = 5) -> float:
    """The machine's core speed as one peer operation: OpenCV's CLAHE (clip 2, 8 × 8 tiles) on a fixed
    ``size``² uint8 tile, one thread, median of ``repeats``. Machines of one kind that all call themselves
    "AMD EPYC" took 53 to 170 ms here: a run's wall-clock figures are read against this."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        tile = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        clahe.apply(tile)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            clahe.apply(tile)
            times.append(time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
    return round(1000 * float(np.median(times)), 1)


def machine_facts() -> dict[str, Any]:
    import cv2
    import dask
    import skimage
    import tifffile

    from bench.record import model_name

    model = model_name()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "cpu": model or platform.processor(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "dask": dask.__version__,
        "scikit_image": skimage.__version__,
        "tifffile": tifffile.__version__,
        "opencv_clahe_5000_ms": opencv_clahe_ms(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=36, help="tiles in the montage (default 36)")
    p.add_argument("--columns", type=int, default=None, help="montage columns (default: about √tiles)")
    p.add_argument("--size", type=int, default=5000, help="tile edge in px (default 5000, the T1 camera)")
    p.add_argument(
        "--overlap", type=float, default=0.1, help="overlap as a fraction of the tile (default 0.1)"
    )
    p.add_argument(
        "--cores", type=int, default=2, help="cores to use: worker processes or threads (default 2)"
    )
    p.add_argument(
        "--executors",
        default="processes,threads",
        help="comma-separated: processes (one single-threaded worker process per core), "
        "threads (one worker, a thread per core); default both",
    )
    p.add_argument("--warmup", type=int, default=2, help="tiles processed before timing (default 2)")
    p.add_argument(
        "--naive-tiles",
        type=int,
        default=4,
        help="tiles for the naive chain: a k×k block, k = √n (default 4; 0 skips)",
    )
    p.add_argument(
        "--workdir", default=None, help="scratch folder (default: a new folder under the temp dir, removed)"
    )
    p.add_argument("--output", default=str(RESULTS), help="results JSON path")
    args = p.parse_args(argv)

    columns = args.columns or max(1, math.ceil(math.sqrt(args.tiles)))
    overlap = int(round(args.size * args.overlap))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="em_bench_tiles_"))
    work.mkdir(parents=True, exist_ok=True)
    mpix = args.size * args.size / 1e6
    load_before = os.getloadavg()
    try:
        t = time.perf_counter()
        montage = write_montage(work, args.tiles, columns, args.size, overlap)
        print(
            f"{args.tiles} raw {args.size}² uint8 tiles ({columns} columns, {overlap} px overlap) written in {time.perf_counter() - t:.1f} s to {work}",
            flush=True,
        )
        runs = {}
        for executor in args.executors.split(","):
            runs[executor] = run_dask(
                montage,
                columns,
                args.size,
                overlap,
                args.cores,
                args.warmup,
                processes=executor == "processes",
            )
            print(f"dask ({executor}): {runs[executor]['tiles_per_s']:.2f} tiles/s", flush=True)
        naive = None
        if args.naive_tiles > 0:
            block = max(1, round(math.sqrt(args.naive_tiles)))
            naive = run_naive(montage, columns, block, args.size, overlap)
            print(f"naive: {naive['tiles_per_s']:.3f} tiles/s", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    result: dict[str, Any] = {
        "benchmark": "tiles",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts() | {"load_average_before": load_before, "load_average_after": load_after},
        "config": {
            "tiles": args.tiles,
            "columns": columns,
            "tile_px": [args.size, args.size],
            "dtype": "uint8",
            "overlap_px": overlap,
            "max_shift_px": max(r["max_shift_px"] for r in runs.values()),
            "cores": args.cores,
            "executors": {
                "processes": f"dask.distributed LocalCluster: {args.cores} worker processes × 1 thread",
                "threads": f"dask.distributed LocalCluster: 1 worker × {args.cores} threads (the platform default)",
            },
            "opencv_threads": 1,
            "chain": "read TIFF → flatfield → CLAHE(2, 16×16) → min/max/mean/std + 256-bin histogram → focus → match top+left",
        },
    }
    for executor, ours in runs.items():
        result[f"em_platform_{executor}"] = summarise(ours, mpix)
    best = max(runs, key=lambda e: runs[e]["tiles_per_s"])
    result["em_platform"] = {"executor": best, **result[f"em_platform_{best}"]}
    result["targets"] = {"tiles_per_s": ALLEN_RATE, "latency_p95_s": LATENCY_TARGET_S}
    if naive is not None:
        result["naive"] = {
            "tiles": naive["tiles"],
            "tiles_per_s": naive["tiles_per_s"],
            "mpix_per_s": naive["tiles_per_s"] * mpix,
            "wall_s": naive["wall_s"],
            "chain_s_p50": percentile(naive["chain_s"], 50),
            "chain_s_p95": percentile(naive["chain_s"], 95),
            "matches_correct_within_1px": f"{naive['matches_correct']}/{naive['matches_total']}",
            "executor": "this process, 1 thread: numpy + scikit-image",
        }
        result["speedup_vs_naive"] = result["em_platform"]["tiles_per_s"] / naive["tiles_per_s"]

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")
    return result


def summarise(ours: dict[str, Any], mpix: float) -> dict[str, Any]:
    out = {
        "tiles_per_s": ours["tiles_per_s"],
        "mpix_per_s": ours["tiles_per_s"] * mpix,
        "wall_s": ours["wall_s"],
        "chain_s_p50": percentile(ours["chain_s"], 50),
        "chain_s_p95": percentile(ours["chain_s"], 95),
        "process_s_p50": percentile(ours["process_s"], 50),
        "match_s_p50": percentile(ours["match_s"], 50),
        "paced_rate_tiles_per_s": ALLEN_RATE,
        "paced_latency_s_p50": percentile(ours["paced_latency_s"], 50),
        "paced_latency_s_p95": percentile(ours["paced_latency_s"], 95),
        "paced_chain_s_p50": percentile(ours["paced_chain_s"], 50),
        "paced_chain_s_p95": percentile(ours["paced_chain_s"], 95),
        "matches_correct_within_1px": f"{ours['matches_correct']}/{ours['matches_total']}",
        "focus_median": statistics.median(ours["focus"]),
        "flatfield_scatter_s": ours["flatfield_scatter_s"],
    }
    out["meets_rate_target"] = out["tiles_per_s"] >= ALLEN_RATE
    out["meets_latency_target"] = out["paced_latency_s_p95"] < LATENCY_TARGET_S
    return out


def print_table(result: dict[str, Any]) -> None:
    cores = result["config"]["cores"]
    columns = [
        (f"dask {cores} processes", result.get("em_platform_processes")),
        (f"dask {cores} threads", result.get("em_platform_threads")),
        ("naive 1 thread", result.get("naive")),
    ]
    columns = [(name, c) for name, c in columns if c is not None]
    rate = ALLEN_RATE

    def cell(c: dict[str, Any], key: str, fmt: str) -> str:
        return format(c[key], fmt) if key in c else "-"

    rows = [
        ("tiles/s", [cell(c, "tiles_per_s", ".2f") for _, c in columns]),
        ("MPix/s", [cell(c, "mpix_per_s", ".1f") for _, c in columns]),
        ("chain s/tile p50", [cell(c, "chain_s_p50", ".3f") for _, c in columns]),
        ("chain s/tile p95", [cell(c, "chain_s_p95", ".3f") for _, c in columns]),
        (f"latency p50 @ {rate} tiles/s", [cell(c, "paced_latency_s_p50", ".3f") for _, c in columns]),
        (f"latency p95 @ {rate} tiles/s", [cell(c, "paced_latency_s_p95", ".3f") for _, c in columns]),
        ("matches within 1 px", [c.get("matches_correct_within_1px", "-") for _, c in columns]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(name), *(len(r[1][i]) for r in rows)) for i, (name, _) in enumerate(columns)]
    print(" " * w0 + "".join(f"  {name:>{w}}" for (name, _), w in zip(columns, widths, strict=True)))
    for label, cells in rows:
        print(f"{label:<{w0}}" + "".join(f"  {v:>{w}}" for v, w in zip(cells, widths, strict=True)))
    ours = result["em_platform"]
    line = f"best: {ours['executor']}"
    if "speedup_vs_naive" in result:
        line += f", {result['speedup_vs_naive']:.1f}× the naive chain"
    line += (
        f"; ≥ {rate} tiles/s: {'met' if ours['meets_rate_target'] else 'NOT met'}"
        f"; p95 latency < {LATENCY_TARGET_S} s: {'met' if ours['meets_latency_target'] else 'NOT met'}"
    )
    print(line)


if __name__ == "__main__":
    main()
    sys.exit(0)
