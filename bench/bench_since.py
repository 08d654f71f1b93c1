"""This checkout's code against an earlier commit's, taking turns in one run: issue 38's machine-bound figures as
ratios any host can measure.

Issue 38 set "MC + CTF ≤ 7 s per 4096² exposure on this machine (9.6 s today)" and "CPU per tile ≤ 150 ms"
(261–307 ms measured then), on a machine no later session has; the hosts since ran the same code 2–4× apart.
Here the code of the commit the issue was filed against (``--commit``, default :data:`ISSUE_38_FILED`) and this
checkout's run the same work in turn (``--rounds`` times each, a fresh process per tree and round), so the
ratio of their medians says how much faster the same work goes now, and the issue's own figures scaled by it
what this code would take on the issue's machine:

* ``motion``: motion correction + CTF of bench_motion's realistic 4096² × 40 uint16 movies (gain, hot pixels,
  beam-induced drift), 3 movies, each tree warmed on a small movie first;
* ``live_tiles``: the live chain's unpaced re-processing of bench_tiles_live's 120 tiles of 5000² (its
  ``_unpaced``, each tree's own: a warm-up pass, then the measured one), CPU per tile.

The earlier tree is checked out as a detached git worktree in a temporary folder, removed after.

    python -m bench.bench_since [--cases motion live_tiles] [--commit SHA] [--movie-dir DIR] [--tiles-dir DIR]

Writes bench/results/since.json (per case, every run kept in ``history``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "since.json"
ISSUE_38_FILED = "58e6f8f3109d55c25fa6ff6c7b8f65606c45764c"  # main when issue 38 was filed (2026-11-26)
MOVIE_SHAPE, FRAMES, MOVIES = (4096, 4096), 40, 3
TILES, COLUMNS, TILE_PX = 120, 6, 5000
ISSUE_38_THEN = {"motion": (9.6, 9.6), "live_tiles": (261.0, 307.0)}  # what the issue measured, low and high


def motion_worker(paths: list[str]) -> None:
    """In a process whose em_platform is the tree under test (PYTHONPATH): one JSON line per movie."""
    import numpy as np

    from em_platform.cryo.ctf import CTFSearch, estimate_ctf
    from em_platform.cryo.motion import correct_movie
    from em_platform.cryo.optics import Microscope
    from em_platform.formats.mrc import read_mrc

    correct_movie(np.asarray(read_mrc(paths[0]).data[:8, :512, :512]), 1.0, 1.2)  # compile and warm
    for path in paths:
        movie = read_mrc(path).data
        gain = np.load(Path(path).with_suffix(".gain.npy"))
        w = time.perf_counter()
        r = correct_movie(movie, 1.0, 1.2, gain=gain)
        mc = time.perf_counter() - w
        w = time.perf_counter()
        estimate_ctf(r.micrograph, 1.0, Microscope(), CTFSearch())
        ctf = time.perf_counter() - w
        _say({"movie": Path(path).name, "mc_s": mc, "ctf_s": ctf, "value": mc + ctf})


def tiles_worker(folder: str) -> None:
    """The tree's own bench_tiles_live._unpaced on the tiles of ``folder`` (made by either tree's _tiles)."""
    from bench.bench_tiles_live import _tiles, _unpaced

    overlap = TILE_PX // 10
    with tempfile.TemporaryDirectory(prefix="bench-since-tiles-") as tmp:
        montage, refs = _tiles(Path(folder), TILES, COLUMNS, TILE_PX, overlap)
        os.environ["EM_SCOPE_SHARES"] = str(Path(folder).resolve())  # where the runs may read tiles
        u = _unpaced(Path(tmp), montage["tiles"], refs, overlap, TILE_PX)
    _say(
        {
            "value": u["cpu_ms_per_tile"],
            "tiles_per_s": u["tiles_per_s"],
            "by_stage": u["cpu_ms_per_tile_by_stage"],
        }
    )


def _say(line: dict) -> None:
    import em_platform

    print(json.dumps(line | {"tree": str(Path(em_platform.__file__).resolve().parents[1])}), flush=True)


def _run_tree(tree: Path, worker: list[str]) -> list[dict]:
    """A worker with ``tree``'s em_platform and bench (this file run as a script from the tree: its own folder
    holds neither package)."""
    env = os.environ | {"PYTHONPATH": str(tree), "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *worker], env=env, capture_output=True, text=True,
        check=False, cwd=tree,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"the worker on {tree} failed: {out.stderr.strip()[-800:]}")
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not runs or {Path(r["tree"]) for r in runs} != {tree.resolve()}:
        raise RuntimeError(f"the worker on {tree} imported em_platform from {[r['tree'] for r in runs]}")
    return runs


def _case(name: str, then: Path, worker: list[str], rounds: int, unit: str) -> dict:
    runs: dict[str, list[dict]] = {"then": [], "now": []}
    for k in range(rounds):
        for side, tree in (("then", then), ("now", REPO)):
            for r in _run_tree(tree, worker):
                runs[side].append(r | {"round": k})
                print(f"{name} round {k} {side:4s}: {r['value']:.2f} {unit}", flush=True)
    median = {side: round(statistics.median(r["value"] for r in v), 3) for side, v in runs.items()}
    ratio = round(median["then"] / median["now"], 2)
    low, high = ISSUE_38_THEN[name]
    return {
        "unit": unit,
        "then_median": median["then"],
        "now_median": median["now"],
        "then_each": [round(r["value"], 3) for r in runs["then"]],
        "now_each": [round(r["value"], 3) for r in runs["now"]],
        "ratio_then_over_now": ratio,
        # the issue's own figures (code of then, its machine) at this ratio: what this code would take there
        "issue_38_then": [low, high],
        "issue_38_scaled": [round(low / ratio, 2), round(high / ratio, 2)],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_since")
    p.add_argument("--cases", nargs="+", choices=list(ISSUE_38_THEN), default=list(ISSUE_38_THEN))
    p.add_argument(
        "--commit", default=ISSUE_38_FILED, help="the earlier code (default: when issue 38 was filed)"
    )
    p.add_argument("--movie-dir", help="keep the movies here (default: a temporary folder, removed)")
    p.add_argument("--tiles-dir", help="keep the tiles here (default: a temporary folder, removed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--motion-worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--tiles-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.motion_worker:
        motion_worker(a.motion_worker)
        return 0
    if a.tiles_worker:
        tiles_worker(a.tiles_worker)
        return 0
    from bench.record import history_stamp

    known = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{a.commit}^{{commit}}"],
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if known.returncode != 0:
        print(f"bench_since: commit {a.commit} is not in this checkout (a shallow clone?): not measured")
        return 0
    commit_now = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result["what"] = "this checkout's code against an earlier commit's (commit_then), taking turns in one run"
    with tempfile.TemporaryDirectory(prefix="bench-since-") as tmp:
        then = Path(tmp) / "then"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(then), a.commit], check=True
        )
        try:
            for name in a.cases:
                if name == "motion":
                    from bench.bench_motion import write_movie

                    folder = Path(a.movie_dir) if a.movie_dir else Path(tmp) / "movies"
                    movies = [str(write_movie(folder, MOVIE_SHAPE, FRAMES, seed)) for seed in range(MOVIES)]
                    measured = _case(name, then, ["--motion-worker", *movies], a.rounds, "s per exposure")
                else:
                    from bench.bench_tiles_live import _tiles

                    folder = Path(a.tiles_dir) if a.tiles_dir else Path(tmp) / "tiles"
                    _tiles(folder, TILES, COLUMNS, TILE_PX, TILE_PX // 10)  # made before either tree runs
                    measured = _case(name, then, ["--tiles-worker", str(folder)], a.rounds, "ms CPU per tile")
                stamp = history_stamp()
                result["date"] = stamp["measured"]
                earlier = result.get(name, {}).get("history", [])
                result[name] = {
                    "date": stamp["measured"],
                    "commit_then": a.commit,
                    "commit_now": commit_now,
                    **stamp,
                    **measured,
                    "history": [
                        *earlier,
                        {
                            **stamp,
                            "then": measured["then_median"],
                            "now": measured["now_median"],
                            "ratio": measured["ratio_then_over_now"],
                        },
                    ],
                }
                RESULTS.write_text(json.dumps(result, indent=2) + "\n")
                shown = {k: v for k, v in result[name].items() if k not in ("history", "runs")}
                print(json.dumps({name: shown}, indent=2), flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(then)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
