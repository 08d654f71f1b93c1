"""The real 4,969-tile TEMCA montage of em_stitch's sdist (fetched into var/em_stitch by scripts/fetch_em_stitch.py): our solves vs em_stitch's.

Both solve the scope's own matcher point pairs (no pixels). Each solve runs in a fresh process (time, peak
RSS); residuals are measured on the same pairs for every solve: the ones em_stitch's RANSAC filter keeps
(10 px), which its BigFeta solve reports on. The reference is ``em_platform.stitch.bigfeta_reference``
(em_stitch's filter + BigFeta's montage solve with its ``affine_template.json``), which reproduces the figure
em_stitch 0.3.4 itself prints for this montage (mean residual 1.956 ± 1.051 px, run here once in a venv of
its own; its polynomial solve: 1.517 ± 0.847 px, 36 s for both solves, 458 MiB).

    python -m bench.bench_temca            # results merged into bench/results/montage.json, key "temca"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METAFILE = REPO / "var" / "em_stitch" / "montage_example" / "_metadata_test_example.json"  # make fetches it
RESULTS = REPO / "bench" / "results" / "montage.json"
SOLVES = ("ours_translation", "ours_rigid", "ours_affine", "ours_polynomial", "ours_affine_lens", "ours_auto",
          "reference_translation", "reference_affine")  # fmt: skip
EM_STITCH_OWN = {
    "affine": {"mean_px": 1.956, "std_px": 1.051},
    "polynomial": {"mean_px": 1.517, "std_px": 0.847},
    "wall_s_both": 36.2,
    "peak_rss_mib": 458,
    "how": "em_stitch 0.3.4 MontageSolver on this metafile (affine + polynomial templates), Python 3.11 venv",
}


def child(solve: str, metafile: Path) -> dict[str, Any]:
    import numpy as np

    from em_platform.stitch.bigfeta_reference import bigfeta_montage_solve, em_stitch_filter
    from em_platform.stitch.lens import estimate_lens
    from em_platform.stitch.model_choice import solve_model
    from em_platform.stitch.solve_affine import PointEdge, residual_stats
    from em_platform.stitch.temca import read_temca_metafile

    montage = read_temca_metafile(metafile)
    stage = {t.name: (t.x, t.y) for t in montage.tiles}
    edges = list(montage.edges)
    size = (montage.width, montage.height)
    began, cpu0 = time.perf_counter(), time.process_time()
    extra: dict[str, Any] = {}
    polynomials = None
    if solve.startswith("reference"):
        transforms = bigfeta_montage_solve(stage, edges, solve.split("_")[1])
    else:
        model = solve.split("_")[1]
        if solve.endswith("lens"):
            fit = estimate_lens(edges, size)
            extra["lens"] = fit.summary()
            edges = [
                PointEdge(e.tile, e.neighbour, fit.model.correct(e.p), fit.model.correct(e.q)) for e in edges
            ]
        solved = solve_model(stage, edges, model, tile_size=size)
        transforms = solved.transforms
        polynomials = solved.polynomials
        extra.update(
            rejected_edges=len(solved.rejected),
            disconnected=len(solved.disconnected),
            torn_edges=len(solved.torn),
            loops=solved.loops,
            residual_per_inlier=solved.inlier_residual_stats,
            **({"model_choice": solved.model_choice} if solved.model_choice else {}),
        )
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    keep = em_stitch_filter(edges)
    vectors = []

    def at(tile, pts):
        if polynomials is not None:
            x, y = pts[:, 0], pts[:, 1]
            return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1) @ polynomials[tile].T
        a = transforms[tile]
        return pts @ a[:, :2].T + a[:, 2]

    for e, w in zip(edges, keep, strict=True):
        vectors.append((at(e.tile, e.p) - at(e.neighbour, e.q))[w > 0])
    stats = {
        k: round(v, 4) if isinstance(v, float) else v for k, v in residual_stats(np.vstack(vectors)).items()
    }
    return {
        "solve_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "residual_per_kept_pair": stats,
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SOLVES, default=list(SOLVES))
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--child", choices=SOLVES, help=argparse.SUPPRESS)
    p.add_argument("--metafile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.metafile))))
        return {}
    if not METAFILE.is_file():
        raise SystemExit(f"{METAFILE} is missing: run `.venv/bin/python scripts/fetch_em_stitch.py`")
    metafile = METAFILE
    runs: dict[str, Any] = {}
    for solve in args.only:
        out = subprocess.run(
            [sys.executable, "-m", "bench.bench_temca", "--child", solve, "--metafile", str(metafile)],
            cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        runs[solve] = json.loads(out.stdout.strip().splitlines()[-1])
        r = runs[solve]
        print(
            f"{solve:24s} {r['solve_s']:6.1f} s  {r['peak_rss_mib']:6.0f} MiB  residual per pair "
            f"{r['residual_per_kept_pair']['mean_px']:.3f} ± {r['residual_per_kept_pair']['std_px']:.3f} px "
            f"(max {r['residual_per_kept_pair']['max_px']:.1f})",
            flush=True,
        )
    out_path = Path(args.output)
    result = json.loads(out_path.read_text()) if out_path.exists() else {"benchmark": "montage"}
    previous = result.get("temca", {}).get("solves", {})
    result["temca"] = {
        "what": "the real 4,969-tile TEMCA montage of em_stitch 0.3.4's sdist (3840² tiles, the scope's matcher "
        "point pairs, 10 per edge); residuals on the pairs em_stitch's RANSAC filter keeps",
        "load_average": os.getloadavg(),
        "solves": {**previous, **runs},
        "em_stitch_itself": EM_STITCH_OWN,
    }
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
