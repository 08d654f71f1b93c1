"""Per-tilt defocus error of the bench's accuracy stack: ours, ours before issue 38, and ASPIRE, side by side.

The stack is bench_cryo's accuracy stack (the demo spec at 2048² × 41 tilts ±60°, 4 Å/px, 3 µm, 3 e/Å² per
tilt, 40 apoferritins, gold beads, 1000 Å astigmatism, 8-frame movies), simulated once into a cache folder
(``--cache``, default /tmp/bench-ctf-tilts) and motion-corrected once there; later runs reuse both.
Per tilt, against the ground truth's defocus at the tilt axis:

- ``ours``: em_platform.cryo.processing.estimate_ctf_series, the platform's path (a window around the
  mdoc's target, then the series' consensus, one astigmatism for the series), timed;
- ``before``: the same path with the estimator as it was before issue 38 (only the tiles near the tilt
  axis, gold beads left in, every ring weighted alike), timed;
- ``noiseless``: ours on the simulator's noiseless copy of the same tilts, the error shot noise has no part in;
- ``aspire``: ASPIRE's CTF estimator (aspire.ctf, Heimowitz, Andén & Singer 2020) on the same motion-corrected
  micrographs, as shipped (its 0.5–10 µm search) and with its 1-D search limited to our first window (the
  mdoc's target ± 50 %), run in ASPIRE's own interpreter (``--aspire-python``, $ASPIRE_PYTHON or
  /tmp/aspire-venv/bin/python; ASPIRE is no dependency of the platform). Without it the file says why.
  Its estimates are kept in the cache (``aspire_<stack>.json``: the micrographs do not change between
  runs; ``--rerun-aspire`` measures again).

Where ours is ≥ 1 % the row states a reason. Writes bench/results/ctf_tilts.json.

python -m bench.bench_ctf_tilts [--sim-folder DIR] [--cache DIR] [--aspire-python PATH] [--no-aspire]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ctf_tilts.json"
DEFAULT_CACHE = Path(os.environ.get("BENCH_CTF_TILTS_CACHE", "/tmp/bench-ctf-tilts"))
ASPIRE_CANDIDATES = (os.environ.get("ASPIRE_PYTHON"), "/tmp/aspire-venv/bin/python")


# -- the stack ----------------------------------------------------------------------------------------


def stack(cache: Path, sim_folder: str | None):
    """(tilt series, workspace, truth, scope): simulated into ``cache`` unless there, motion-corrected once."""
    from em_platform.cryo import processing as proc
    from em_platform.cryo import session as sess
    from em_platform.cryo.motion import MotionSettings
    from em_platform.cryo.optics import Microscope
    from em_platform.simulation.truth import read_ground_truth

    root = Path(sim_folder) if sim_folder else cache / "simulation"
    if not sim_folder and not (root / "bench_accuracy").is_dir():
        from bench.bench_cryo import case_simulate

        print(f"simulating the accuracy stack into {cache} (minutes)", flush=True)
        case_simulate(str(cache), 2048, 41)
    found, _ = sess.discover(root, "simulation")
    ts = next(t for t in found if t.truth is not None)
    ws = proc.Workspace(cache / "workspace", ts.key)
    if not (ws.step("motioncorr") / "corrected.mrc").is_file():
        print("motion-correcting the stack once (minutes)", flush=True)
        proc.motion_correct(ts, ws, MotionSettings())
    truth = read_ground_truth(ts.truth)
    return ts, ws, truth, Microscope(ts.voltage_kV, truth.cs_mm, truth.amplitude_contrast)


def before_series(ts, data, scope) -> list:
    """estimate_ctf_series's passes with the estimator as it was: near-axis tiles only, beads left in."""
    import dask
    import numpy as np

    from em_platform.cryo import processing as proc
    from em_platform.cryo.ctf import (
        CTFSearch,
        TiltedView,
        defocus_window,
        estimate_ctf,
        fit_series_astigmatism,
    )

    search = CTFSearch(erase_gold=False, snr_weighting=False)
    views = [TiltedView(t.angle_deg, ts.tilt_axis_deg, resample=False) for t in ts.tilts]
    n = len(ts.tilts)

    def run(windows):  # Dask threads over tilts, as estimate_ctf_series
        def one(i):
            return estimate_ctf(
                np.asarray(data[i], np.float32), ts.pixel_A, scope, search, windows[i], views[i]
            )

        return list(dask.compute(*[dask.delayed(one)(i) for i in range(n)], scheduler="threads"))

    est = run([defocus_window(t.nominal_defocus_A, proc.NOMINAL_WINDOW) for t in ts.tilts])
    consensus = float(np.median([e.mean_defocus_A for e in est]))
    windows = [defocus_window(consensus, *proc.CONSENSUS_WINDOW)] * n
    return [e.mean_defocus_A for e in fit_series_astigmatism(run(windows), scope, search, windows)]


def ours_series(ts, ws, scope, noiseless: bool = False) -> list:
    """The platform's path; on the noiseless copy through a workspace whose 'corrected' stack is that copy."""
    from em_platform.cryo import processing as proc
    from em_platform.cryo.ctf import CTFSearch

    if noiseless:
        clean = Path(str(ts.stack).replace(".mrc", "_noiseless.mrc"))
        ws = proc.Workspace(ws.dir.parent / "noiseless", ts.key)
        (ws.step("motioncorr")).mkdir(parents=True, exist_ok=True)
        link = ws.step("motioncorr") / "corrected.mrc"
        if not link.exists():
            link.symlink_to(clean)
    doc = proc.estimate_ctf_series(ts, ws, scope, CTFSearch())
    return [0.5 * (r["defocus_u_A"] + r["defocus_v_A"]) for r in doc["tilts"]]


# -- ASPIRE, in its own interpreter --------------------------------------------------------------------


def aspire_python(given: str | None) -> tuple[str | None, str]:
    """An interpreter that imports aspire, and what was found (the reason when none)."""
    tried = [given] if given else [c for c in ASPIRE_CANDIDATES if c]
    for exe in tried:
        if not exe or not Path(exe).exists():
            continue
        with tempfile.TemporaryDirectory(prefix="bench-ctf-aspire-") as tmp:  # aspire logs into ./logs
            out = subprocess.run(
                [exe, "-c", "import aspire; print(aspire.__version__)"],
                capture_output=True,
                text=True,
                check=False,
                cwd=tmp,
            )
        if out.returncode == 0:
            return exe, f"aspire {out.stdout.strip()} ({exe})"
    return None, (
        "not measured: no interpreter with the aspire package (tried "
        + ", ".join(str(t) for t in tried)
        + "); pip install aspire into a separate venv and pass --aspire-python"
    )


def aspire_estimates(exe: str, data, pixel_A: float, window_A: tuple[float, float], scope) -> list[dict]:
    """ASPIRE on every micrograph of ``data``, one subprocess; per tilt its two estimates and seconds."""
    import mrcfile
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-ctf-aspire-") as tmp:
        for i in range(len(data)):
            with mrcfile.new(Path(tmp) / f"tilt_{i:03d}.mrc", overwrite=True) as m:
                m.set_data(np.asarray(data[i], np.float32))
        cmd = [exe, str(Path(__file__).resolve()), "--aspire-worker", tmp, str(pixel_A)]
        cmd += [str(window_A[0] / 10), str(window_A[1] / 10), str(scope.cs_mm), str(scope.amplitude_contrast)]
        cmd += [str(scope.voltage_kV)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp)  # its logs/ go too
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "aspire failed")
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def aspire_worker(folder: str, pixel_A: float, lo_nm: float, hi_nm: float, cs: float, w: float, kv: float):
    """Inside ASPIRE's interpreter: aspire.ctf.estimate_ctf's steps for each micrograph of ``folder`` (its
    defaults: 512² multitaper PSD, 2 tapers, 30 Å low end; the high end here 2.2 px as ours), once with its
    own 1-D search (0.5–10 µm) and once with the search over [lo_nm, hi_nm]; prints one JSON line each."""
    import mrcfile
    import numpy as np
    from aspire.basis import FFBBasis2D
    from aspire.ctf import CtfEstimator
    from aspire.utils import grid_2d, voltage_to_wavelength

    psd, g_min, g_max = 512, 30.0, 2.2 * pixel_A
    ac = float(np.arctan(w / np.sqrt(1 - w**2)))
    lmbd = voltage_to_wavelength(kv) / 10
    est = CtfEstimator(pixel_A, cs, ac, kv, psd, 2, dtype=np.float64)
    ffb = FFBBasis2D((psd, psd), 2, dtype=np.float64)
    g = grid_2d(psd, normalized=True, indexing="yx", dtype=np.float64)
    r, th = g["r"] / 2 * (10 / pixel_A), g["phi"]
    for name in sorted(os.listdir(folder)):
        t0 = time.perf_counter()
        with mrcfile.open(os.path.join(folder, name), permissive=True) as m:
            micrograph = np.asarray(m.data, np.float64)
        observed = est.estimate_psd(est.preprocess_micrograph(micrograph, psd), est.tapers(psd, 1, 2))
        amp, _ = est.elliptical_average(ffb, observed, True)
        signal_1d, background_1d = est.background_subtract_1d(amp, linprog_method="highs")
        signal, _ = est.background_subtract_2d(observed, background_1d, 12)
        ratio = est.pca(observed, pixel_A, g_min, g_max)
        signal, _ = est.elliptical_average(ffb, signal.sqrt(), False)
        shared = time.perf_counter() - t0
        row = {"name": name}
        for key, lo, hi in (("shipped", 500, 10000), ("windowed", int(lo_nm), int(hi_nm))):
            t1 = time.perf_counter()
            avg, _ = est.opt1d(signal_1d, pixel_A, cs, lmbd, ac, observed.shape[-1], lo, hi)
            df1 = avg * 2 / (1 + ratio)
            best = None
            for a in range(6):
                res = est.gd(signal, df1, avg * 2 - df1, -5 / 12 * np.pi + a * np.pi / 6, r, th, pixel_A,
                             g_min, g_max, ac, lmbd, cs)  # fmt: skip
                if best is None or res[3] > best[3]:
                    best = res
            row[key] = {
                "defocus_u_A": float(best[0]) * 10,
                "defocus_v_A": float(best[1]) * 10,
                "angle_deg": float(np.degrees(best[2])),
                "s": round(shared + time.perf_counter() - t1, 2),
            }
        print(json.dumps(row), flush=True)


# -- the table ----------------------------------------------------------------------------------------


def _pct(est: float | None, true: float) -> float | None:
    return None if est is None else round(100 * (est - true) / true, 3)


def _summary(errors: list) -> dict:
    a = [abs(e) for e in errors if e is not None]
    if not a:
        return {}
    a.sort()
    mid = len(a) // 2
    median = a[mid] if len(a) % 2 else 0.5 * (a[mid - 1] + a[mid])
    return {
        "median_pct": round(median, 3),
        "worst_pct": round(a[-1], 3),
        "tilts_ge_1pct": sum(e >= 1 for e in a),
    }


def reason(row: dict, spread: float) -> str | None:
    """Why ours is ≥ 1 % on this tilt, from what the row measured."""
    if row["ours_pct"] is None or abs(row["ours_pct"]) < 1.0:
        return None
    clean = row.get("noiseless_pct")
    text = (
        f"shot noise: {row['dose_e_per_A2']:g} e/Å² on this tilt (accumulated before it "
        f"{row['accumulated_dose_e_per_A2']:g}); the spread of our errors over the series is {spread:.2f} % "
        f"(1 σ), this one is {abs(row['ours_pct']) / spread:.1f} σ"
    )
    if clean is not None:
        text += f"; without shot noise the same tilt is {clean:+.2f} %"
    if row.get("aspire_windowed_pct") is not None:
        text += f"; ASPIRE on it: {row['aspire_windowed_pct']:+.1f} % (windowed)"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_ctf_tilts")
    p.add_argument("--sim-folder", help="a simulator root (<data root>/simulation) holding the stack")
    p.add_argument(
        "--cache", default=str(DEFAULT_CACHE), help="where the stack is simulated and corrected once"
    )
    p.add_argument("--aspire-python", help="an interpreter with the aspire package")
    p.add_argument("--no-aspire", action="store_true")
    p.add_argument("--rerun-aspire", action="store_true", help="ignore ASPIRE's cached estimates")
    p.add_argument("--aspire-worker", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.aspire_worker:
        folder, *nums = a.aspire_worker
        aspire_worker(folder, *map(float, nums))
        return 0

    import numpy as np

    from em_platform.cryo import processing as proc
    from em_platform.cryo.ctf import defocus_window

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ts, ws, truth, scope = stack(cache, a.sim_folder)
    data = proc.micrographs(ts, ws)
    n = len(ts.tilts)
    by_z = {t.z_index: t for t in truth.tilts}
    timings = {}

    def timed(key, fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        timings[key] = {
            "wall_s": round(time.perf_counter() - w, 1),
            "cpu_s": round(time.process_time() - c, 1),
            "wall_s_per_tilt": round((time.perf_counter() - w) / n, 2),
        }
        return out

    print("ours", flush=True)
    ours = timed("ours", lambda: ours_series(ts, ws, scope))
    print("before", flush=True)
    before = timed("before", lambda: before_series(ts, data, scope))
    print("ours, noiseless", flush=True)
    clean = timed("noiseless", lambda: ours_series(ts, ws, scope, noiseless=True))
    aspire, aspire_note = None, "skipped (--no-aspire)"
    if not a.no_aspire:
        cached = cache / f"aspire_{ts.key}.json"
        exe, aspire_note = aspire_python(a.aspire_python)
        if cached.is_file() and not a.rerun_aspire:
            kept = json.loads(cached.read_text())
            aspire, aspire_note = kept["tilts"], kept["note"] + f" (estimates kept in {cached})"
            timings["aspire"] = kept["timing"]
        elif exe:
            print(f"ASPIRE: {aspire_note}", flush=True)
            window = defocus_window(ts.tilts[0].nominal_defocus_A, proc.NOMINAL_WINDOW)
            w = time.perf_counter()
            try:
                aspire = aspire_estimates(exe, data, ts.pixel_A, window, scope)
            except RuntimeError as e:
                aspire_note += f"; failed: {e}"
            timings["aspire"] = {"wall_s": round(time.perf_counter() - w, 1)}
            if aspire:
                doc = {"note": aspire_note, "timing": timings["aspire"], "tilts": aspire}
                cached.write_text(json.dumps(doc, indent=1))
    rows = []
    for i, tilt in enumerate(ts.tilts):
        t = by_z[tilt.z_index]
        row = {
            "index": i,
            "z_index": tilt.z_index,
            "angle_deg": round(t.true_angle_deg, 2),
            "dose_e_per_A2": t.dose_e_per_A2,
            "accumulated_dose_e_per_A2": t.accumulated_dose_e_per_A2,
            "true_defocus_A": round(t.defocus_A, 1),
            "ours_pct": _pct(ours[i], t.defocus_A),
            "before_pct": _pct(before[i], t.defocus_A),
            "noiseless_pct": _pct(clean[i], t.defocus_A),
        }
        if aspire:
            for key in ("shipped", "windowed"):
                v = aspire[i][key]
                row[f"aspire_{key}_pct"] = _pct(0.5 * (v["defocus_u_A"] + v["defocus_v_A"]), t.defocus_A)
            row["aspire_s"] = aspire[i]["windowed"]["s"]
        rows.append(row)
    spread = float(np.std([r["ours_pct"] for r in rows]))
    for row in rows:
        row["reason"] = reason(row, spread)
    summary = {
        "ours": _summary([r["ours_pct"] for r in rows]),
        "before": _summary([r["before_pct"] for r in rows]),
        "noiseless": _summary([r["noiseless_pct"] for r in rows]),
    }
    if aspire:
        summary["aspire_shipped"] = _summary([r["aspire_shipped_pct"] for r in rows])
        summary["aspire_windowed"] = _summary([r["aspire_windowed_pct"] for r in rows])
        timings["aspire"]["s_per_tilt"] = round(float(np.mean([r["aspire_s"] for r in rows])), 2)
    from bench.record import history_stamp

    earlier = json.loads(RESULTS.read_text()).get("history", []) if RESULTS.is_file() else []
    results = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
        "stack": {"key": ts.key, "tilts": n, "pixel_A": ts.pixel_A, "shape": list(np.shape(data)[1:])},
        "aspire": aspire_note,
        "summary": summary,
        "timings": timings,
        "ours_spread_pct": round(spread, 3),
        "tilts": rows,
        "history": [
            *earlier,
            {
                **history_stamp(),
                "ours": summary["ours"],
                "aspire_windowed": summary.get("aspire_windowed"),
                "ours_wall_s_per_tilt": timings["ours"]["wall_s_per_tilt"],
            },
        ],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'i':>3} {'angle':>7} {'ours %':>8} {'before %':>9} {'noiseless %':>11} {'ASPIRE %':>9}")
    for r in rows:
        asp = r.get("aspire_windowed_pct")
        print(f"{r['index']:>3} {r['angle_deg']:>7.1f} {r['ours_pct']:>8.3f} {r['before_pct']:>9.3f} "
              f"{r['noiseless_pct']:>11.3f} {'' if asp is None else f'{asp:9.2f}'}")  # fmt: skip
    print(json.dumps({"summary": summary, "timings": timings, "aspire": aspire_note}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
