"""Cryo processing speed and memory against a live session's budget and plain references, plus accuracy on
simulated stacks.

Each case runs in its own subprocess (its own peak RSS), timed in wall and CPU seconds:
- motion correction of an N² × F-frame movie (default 4096² × 40, Poisson counts, drifting) — vs the live
  budget of one exposure every 5–10 s per microscope (and UCSFImage4's ~60 s for MC + CTF);
- CTF estimation of an N² micrograph (default 4096²);
- WBP and SIRT of T × M² projections to an M² × Z tomogram (default 41 × 1024² → 1024² × 256), against
  scikit-image's ``iradon`` slice by slice (a plain reference; timed on ``--iradon-slices`` slices and
  scaled to all of them);
- accuracy and denoiser choice: the processing steps on a simulator stack (``--sim-folder``, a folder the
  simulator published; by default one simulated here: the demo spec at 2048² × 41 tilts with 40
  apoferritins, gold beads, 1000 Å astigmatism and 8-frame movies), scored by ``em_platform.cryo.evaluation``; every
  denoiser's PSNR gain and CPU time on its tomogram.

python -m bench.run cryo                       # full sizes (minutes; run under flock /work/wt/bench.lock)
python -m bench.run cryo -- --quick            # small sizes, for development
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cryo.json"


def _measure(fn) -> dict:
    w, c = time.perf_counter(), time.process_time()
    extra = fn() or {}
    return {
        "wall_s": round(time.perf_counter() - w, 3),
        "cpu_s": round(time.process_time() - c, 3),
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **extra,
    }


def case_motion(n: int, frames: int) -> dict:
    import mrcfile
    import numpy as np

    from em_platform.cryo.motion import MotionSettings, correct_movie

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "movie.mrc"
    base = rng.normal(1.0, 0.1, (n, n)).astype(np.float32)
    m = mrcfile.new_mmap(path, shape=(frames, n, n), mrc_mode=6, overwrite=True)  # uint16 counts
    for i in range(frames):  # written frame by frame: the movie never sits in memory whole
        m.data[i] = rng.poisson(np.roll(base, (i // 4, i // 3), axis=(0, 1)) * 1.5)
    m.close()
    movie = mrcfile.mmap(path, mode="r").data

    def run():
        r = correct_movie(movie, 1.0, 1.0, settings=MotionSettings())
        return {"local_applied": r.local_applied, "total_motion_px": round(r.metrics["total_motion_px"], 2)}

    return _measure(run) | {"shape": [frames, n, n]}


def case_ctf(n: int) -> dict:
    import numpy as np

    from em_platform.cryo.ctf import CTFSearch, estimate_ctf
    from em_platform.cryo.optics import CTFParams, Microscope, ctf_2d

    rng = np.random.default_rng(1)
    scope = Microscope()
    img = np.fft.ifft2(
        np.fft.fft2(rng.normal(size=(n, n)).astype(np.float32))
        * ctf_2d((n, n), 1.0, CTFParams(20500, 19500, 30), scope)
    ).real.astype(np.float32)
    img += rng.normal(0, img.std(), img.shape).astype(np.float32)

    def run():
        e = estimate_ctf(img, 1.0, scope, CTFSearch())
        return {"defocus_error_pct": round(abs(e.mean_defocus_A - 20000) / 200, 3)}

    return _measure(run) | {"shape": [n, n]}


def case_tomogram(tilts: int, m: int, z: int, method: str, iradon_slices: int) -> dict:
    import numpy as np

    from em_platform.cryo.reconstruction import reconstruct

    rng = np.random.default_rng(2)
    angles = np.linspace(-60, 60, tilts)
    stack = rng.normal(size=(tilts, m, m)).astype(np.float32)
    if method == "iradon":
        from skimage.transform import iradon

        def run():
            for y in range(iradon_slices):
                iradon(stack[:, y, :].T, theta=angles, filter_name="ramp", circle=False, output_size=m)
            return {"slices_timed": iradon_slices, "scaled_to": m}

        out = _measure(run)
        out["wall_s_all_slices"] = round(out["wall_s"] * m / iradon_slices, 1)
        out["cpu_s_all_slices"] = round(out["cpu_s"] * m / iradon_slices, 1)
        return out | {"output": f"{m} x {m} per slice (iradon's square)"}

    def run():
        reconstruct(stack, angles, z, method=method, iterations=20)

    return _measure(run) | {
        "shape_in": [tilts, m, m],
        "shape_out": [z, m, m],
        "iterations": 20 if method == "sirt" else None,
    }


def case_simulate(folder: str, n: int, tilts: int) -> dict:
    """The demo spec scaled to an n² detector and ``tilts`` tilts over ±60°, published under ``folder``."""
    import yaml

    from em_platform.simulation.cryoet.examples import DEMO_SPEC
    from em_platform.simulation.cryoet.spec import spec_from_dict
    from em_platform.simulation.cryoet.stack import simulate_stack
    from em_platform.storage import DataStore

    doc = yaml.safe_load(DEMO_SPEC)
    doc["name"] = "bench_accuracy"
    doc["bead_occupancy"] = 0.002  # ~25 beads of 10 nm in the field, as a tomography grid is prepared
    doc["particles"][0]["count"] = 40
    doc["geometry"].update(theta_start=-60, theta_incr=120 / (tilts - 1), ntilts=tilts)
    doc["detector"].update(det_pix_x=n, det_pix_y=n)
    doc["movies"]["frames"] = 8
    doc["optics"].update(astigmatism=0.1, astigmatism_angle=30.0)  # 1000 Å: the angle is scored above 500 Å
    t = time.perf_counter()
    result = simulate_stack(spec_from_dict(doc, "bench_cryo"), 0, DataStore(folder))
    return {"folder": str(result.folder), "wall_s": round(time.perf_counter() - t, 1)}


def case_accuracy(folder: str) -> dict:
    """The whole processing of one simulated stack, scored; every denoiser on its tomogram."""
    import numpy as np

    from em_platform.cryo import denoise as dn
    from em_platform.cryo import evaluation as ev
    from em_platform.cryo import processing as proc
    from em_platform.cryo import session as sess
    from em_platform.cryo.alignment import AlignmentSettings
    from em_platform.cryo.ctf import CTFSearch
    from em_platform.cryo.motion import MotionSettings
    from em_platform.cryo.optics import Microscope
    from em_platform.simulation.truth import read_ground_truth

    root = Path(folder)
    found, errors = sess.discover(root, "simulation")
    ts = next(t for t in found if t.truth is not None)
    ws = proc.Workspace(tempfile.mkdtemp(), ts.key)
    truth = read_ground_truth(ts.truth)
    scope = Microscope(ts.voltage_kV, truth.cs_mm, truth.amplitude_contrast)
    steps = {}
    for name, fn in (
        ("motion", lambda: proc.motion_correct(ts, ws, MotionSettings())),
        ("ctf", lambda: proc.estimate_ctf_series(ts, ws, scope, CTFSearch())),
        ("alignment", lambda: proc.align_series(ts, ws, AlignmentSettings())),
        ("tomogram", lambda: proc.tomogram_series(ts, ws, scope, proc.TomogramSettings())),
        ("denoise", lambda: proc.denoise_series(ts, ws, dn.DEFAULT_METHOD)),
    ):
        steps[name] = _measure(lambda fn=fn: fn() and {})
    fig = ev.evaluate(ts, ws, truth, scope, proc.TomogramSettings())
    tomo = ws.json("tomogram", "tomogram.json")
    noisy = ev._read(Path(tomo["files"]["wbp"]))
    even, odd = (ev._read(ws.step("tomogram") / f"half_{k}.mrc") for k in ("even", "odd"))
    # the clean reference again, for every denoiser (evaluate() removed its scratch)
    clean = _clean_reference(ts, ws, truth, scope, tomo)
    choices = {}
    for method in dn.METHODS:
        c = time.process_time()
        out, used = dn.denoise(noisy, method, even, odd)
        choices[method] = {
            "cpu_s": round(time.process_time() - c, 2),
            "psnr_gain_dB": round(dn.matched_psnr(out, clean) - dn.matched_psnr(noisy, clean), 3),
        }
    return {
        "stack": str(ts.stack),
        "shape": list(np.shape(proc.micrographs(ts, ws))),
        "steps": steps,
        "figures": _strip_curves(fig),
        "denoise": {"default": dn.DEFAULT_METHOD, "candidates": choices},
    }


def _clean_reference(ts, ws, truth, scope, tomo):
    from em_platform.cryo import evaluation as ev
    from em_platform.cryo import processing as proc

    out = Path(tempfile.mkdtemp()) / "c_wbp.mrc"
    return ev._read(ev.clean_reference(ts, ws, truth, scope, tomo, proc.TomogramSettings(), out))


def _strip_curves(doc):
    if isinstance(doc, dict):
        return {k: _strip_curves(v) for k, v in doc.items() if k != "curve"}
    if isinstance(doc, float) and not math.isfinite(doc):
        return str(doc)
    return doc


def _subprocess(case: str, *args) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_cryo", "--case", case, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_cryo")
    p.add_argument("--case")
    p.add_argument("args", nargs="*")
    p.add_argument("--quick", action="store_true", help="small sizes (development)")
    p.add_argument("--sim-folder", help="a simulator root (<data root>/simulation) to score")
    p.add_argument("--iradon-slices", type=int, default=16)
    p.add_argument(
        "--only-accuracy", action="store_true", help="only the accuracy case (the speed cases kept from the file)"
    )
    a = p.parse_args(argv)
    if a.case:  # inside the subprocess
        fn = {
            "motion": case_motion,
            "ctf": case_ctf,
            "tomogram": case_tomogram,
            "simulate": case_simulate,
            "accuracy": case_accuracy,
        }[a.case]
        args = [int(x) if x.isdigit() else x for x in a.args]
        print(json.dumps(fn(*args), default=str))
        return 0
    n, frames, ctf_n, tilts, m, z = (
        (1024, 10, 1024, 21, 256, 64) if a.quick else (4096, 40, 4096, 41, 1024, 256)
    )
    machine = {
        "cpus": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": list(__import__("os").getloadavg()),
    }
    if a.only_accuracy and RESULTS.is_file():  # keep the speed cases of the last full run
        results = json.loads(RESULTS.read_text())
        results["accuracy_machine"] = machine
    else:
        results = {
            "machine": machine,
            "quick": a.quick,
            "live_budget_s_per_exposure": [5, 10],
            "ucsfimage4_mc_plus_ctf_s": 60,
            "motion_correction": _subprocess("motion", n, frames),
            "ctf": _subprocess("ctf", ctf_n),
            "wbp": _subprocess("tomogram", tilts, m, z, "wbp", a.iradon_slices),
            "sirt": _subprocess("tomogram", tilts, m, z, "sirt", a.iradon_slices),
            "iradon_reference": _subprocess("tomogram", tilts, m, z, "iradon", a.iradon_slices),
        }
        w = results["wbp"].get("wall_s")
        r = results["iradon_reference"].get("wall_s_all_slices")
        if w and r:
            results["wbp_speedup_vs_iradon"] = round(r / w, 2)
        mc, ct = results["motion_correction"].get("wall_s"), results["ctf"].get("wall_s")
        if mc and ct:
            results["mc_plus_ctf_s_per_exposure"] = round(mc + ct, 1)
    with tempfile.TemporaryDirectory(prefix="bench-cryo-") as tmp:
        folder = a.sim_folder
        if folder is None:
            sim_n, sim_tilts = (512, 21) if a.quick else (2048, 41)
            results["accuracy_stack"] = _subprocess("simulate", tmp, sim_n, sim_tilts)
            folder = str(Path(tmp) / "simulation")
        results["accuracy"] = _subprocess("accuracy", folder)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
