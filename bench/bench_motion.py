"""Motion correction against a competent plain aligner at every detector size, side by side in one run.

For each size (2048² × 40, 3072² × 40, 4096² × 40 and K3 frames 5760 × 4092 × 40) and each of ``--movies``
realistic movies (em_platform.simulation.beam_motion: an early exponential jump, slow drift, weak phase
contrast through a CTF, 1.2 e/px/frame, per-pixel gain, 200 hot pixels; written once as uint16 MRC), ours
(em_platform.cryo.motion.correct_movie on the movie as processing hands it over: the lazy dask array
em_platform.formats.mrc.read_mrc makes) and the plain aligner (bench.bench_cryo.plain_motion_correction:
2× binned phase correlation with upsampling, Fourier-shift sum, on the mrcfile memory map) run
interleaved: movie 1 ours then plain, movie 2 plain then ours, and so on. Each runs in its own worker
process per size (fresh per size: its peak RSS is that size's), warm (imports and first calls taken by a
small movie beforehand, untimed: a facility's worker is warm), with OpenBLAS at one thread (ours holds it
there itself; the plain aligner's small matrix products lost 40-60 % more CPU to BLAS's spinning helper
threads here), the movie's file read into the page cache before every call. Timed in wall and CPU
seconds (all threads), the load average recorded before each call.

Reported per size: both methods' times and drift errors against the true trajectory, the ratio plain /
ours (medians), ours' per-stage seconds (MotionResult.timings: read, gain and defects, alignment, patches,
sum and dose weighting; plus writes: the three sums written into MRC stacks as processing's correct_tilt
does), ours once more on the first movie as an LZW-compressed TIFF (``--tiff-sizes``, default 4096²: the
read stage is then the decompression, as for SerialEM's compressed frames), and at 4096² MC + CTF per
exposure (em_platform.cryo.ctf.estimate_ctf on our micrograph, its defocus against the movie's 15000 Å).

python -m bench.bench_motion                             # all sizes, 3 movies each (≈ 20 min + movies)
python -m bench.bench_motion --sizes 2048 --movies 1     # one size, one movie
python -m bench.bench_motion --movie-dir /tmp/mc         # keep the movies there (≈ 13 GB) for the next run
python -m bench.bench_motion --sizes 4096 --merge        # measure one size again, keep the others' results

Without --movie-dir the movies are written to a temporary folder (about a minute each; the K3 ones 2-4
minutes) and each size's removed once measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"2048": (2048, 2048), "3072": (3072, 3072), "4096": (4096, 4096), "k3": (4092, 5760)}
FRAMES = 40
PIXEL_A, DOSE_PER_FRAME, DEFOCUS_A = 1.0, 1.2, 15000.0
RESULTS = Path(__file__).resolve().parent / "results" / "motion.json"
TARGETS = {"ratio_vs_plain_at_every_size": 2.0, "mc_plus_ctf_s_per_4096_exposure": 7.0}


def movie_path(folder: Path, shape: tuple[int, int], frames: int, seed: int) -> Path:
    return folder / f"movie_{frames}x{shape[0]}x{shape[1]}_s{seed}.mrc"


def write_movie(folder: Path, shape: tuple[int, int], frames: int, seed: int) -> Path:
    """The realistic movie (uint16 MRC) with its gain (.gain.npy) and true drift (.truth.npy), unless there."""
    import mrcfile
    import numpy as np

    from em_platform.simulation.beam_motion import MovieSpec, movie_frames

    path = movie_path(folder, shape, frames, seed)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    spec = MovieSpec(
        shape=shape,
        n_frames=frames,
        e_per_px_frame=DOSE_PER_FRAME,
        hot_pixels=200,
        defocus_A=DEFOCUS_A,
        seed=seed,
    )
    it, gain, truth = movie_frames(spec)
    part = path.with_suffix(".part")
    m = mrcfile.new_mmap(part, shape=(frames, *shape), mrc_mode=6, overwrite=True)
    for i, frame in enumerate(it):
        m.data[i] = frame
    m.voxel_size = PIXEL_A
    m.close()
    np.save(path.with_suffix(".gain.npy"), gain)
    np.save(path.with_suffix(".truth.npy"), truth)
    part.rename(path)
    return path


# ---------------------------------------------------------------------------------------------------
# The workers (one process per method and size)


def _peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _ours(path: Path, ctf: bool, scratch: Path) -> dict:
    import numpy as np

    from bench.bench_cryo import drift_rms_error_px
    from em_platform.cryo.motion import correct_movie
    from em_platform.cryo.processing import new_mrc_mmap
    from em_platform.formats.mrc import read_mrc

    source = _source(path)
    gain = np.load(source.with_suffix(".gain.npy"))
    truth = np.load(source.with_suffix(".truth.npy"))
    if path.suffix == ".tif":
        from em_platform.formats.tiff import read_tiff

        movie = read_tiff(path).data
    else:
        movie = read_mrc(path).data  # what processing's session.load_movie hands over
    w, c = time.perf_counter(), time.process_time()
    r = correct_movie(movie, PIXEL_A, DOSE_PER_FRAME, gain=gain)
    mc_wall, mc_cpu = time.perf_counter() - w, time.process_time() - c
    w, c = time.perf_counter(), time.process_time()
    for name, img in (("corrected", r.micrograph), ("even", r.even), ("odd", r.odd)):  # as correct_tilt
        new_mrc_mmap(scratch / f"{name}.mrc", (1, *img.shape), PIXEL_A).close()
        import mrcfile

        with mrcfile.mmap(scratch / f"{name}.mrc", mode="r+") as m:
            m.data.reshape(-1, *img.shape)[0] = img
    writes = (time.perf_counter() - w, time.process_time() - c)
    out = {
        "wall_s": round(mc_wall, 3),
        "cpu_s": round(mc_cpu, 3),
        "stages_wall_s": r.timings["wall_s"] | {"writes": round(writes[0], 4)},
        "stages_cpu_s": r.timings["cpu_s"] | {"writes": round(writes[1], 4)},
        "drift_rms_error_px": round(drift_rms_error_px(r.shifts_px, truth), 4),
        "trajectory_model": r.metrics.get("trajectory_model"),
        "local_applied": r.local_applied,
        "local_chi2": r.metrics.get("local_chi2"),
    }
    if ctf:
        from em_platform.cryo.ctf import CTFSearch, estimate_ctf
        from em_platform.cryo.optics import Microscope

        w, c = time.perf_counter(), time.process_time()
        e = estimate_ctf(r.micrograph, PIXEL_A, Microscope(), CTFSearch())
        out["ctf"] = {
            "wall_s": round(time.perf_counter() - w, 3),
            "cpu_s": round(time.process_time() - c, 3),
            "defocus_A": round(e.mean_defocus_A, 1),
            "defocus_error_pct": round(abs(e.mean_defocus_A - DEFOCUS_A) / DEFOCUS_A * 100, 3),
        }
    return out


def _source(path: Path) -> Path:
    """The MRC a movie file was made from (an LZW TIFF copy is named <movie>.lzw.tif)."""
    return path.with_name(path.name.removesuffix(".lzw.tif") + ".mrc") if path.suffix == ".tif" else path


def lzw_tiff(path: Path) -> Path:
    """An LZW-compressed TIFF copy of the movie (as SerialEM writes compressed frames), unless there."""
    import mrcfile
    import numpy as np
    import tifffile

    out = path.with_name(path.stem + ".lzw.tif")
    if not out.is_file():
        part = out.with_suffix(".part")
        frames = mrcfile.mmap(path, mode="r").data
        tifffile.imwrite(part, np.asarray(frames), compression="lzw", photometric="minisblack")
        part.rename(out)
    return out


def _plain(path: Path, ctf: bool, scratch: Path) -> dict:
    import mrcfile
    import numpy as np

    from bench.bench_cryo import drift_rms_error_px, plain_motion_correction

    gain = np.load(path.with_suffix(".gain.npy"))
    truth = np.load(path.with_suffix(".truth.npy"))
    movie = mrcfile.mmap(path, mode="r").data
    w, c = time.perf_counter(), time.process_time()
    _, shifts = plain_motion_correction(movie, gain)
    return {
        "wall_s": round(time.perf_counter() - w, 3),
        "cpu_s": round(time.process_time() - c, 3),
        "drift_rms_error_px": round(drift_rms_error_px(shifts, truth), 4),
    }


def worker(kind: str) -> int:
    """Warm up on a small movie, say so, then time one movie per request line (JSON in, JSON out)."""
    run = {"ours": _ours, "plain": _plain}[kind]
    with tempfile.TemporaryDirectory(prefix=f"bench-motion-{kind}-") as tmp:
        scratch = Path(tmp)
        warm = write_movie(scratch / "warm", (256, 256), 8, 0)
        run(warm, True, scratch)
        print(json.dumps({"ready": True, "peak_rss_MiB": _peak_rss_mib()}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            out = run(Path(request["path"]), request.get("ctf", False), scratch)
            print(json.dumps(out | {"peak_rss_MiB": _peak_rss_mib()}), flush=True)
    return 0


class Worker:
    def __init__(self, kind: str):
        self.kind = kind
        # OpenBLAS at one thread for both: ours holds it there itself (em_platform.cryo.blas_threads); the
        # plain aligner's upsampled DFTs are small matrix products too, and BLAS's spinning helper threads
        # cost it 40-60 % more CPU on this 2-core machine under load
        env = os.environ | {"OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_motion", "--worker", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker ended (rc {self.proc.wait()}); its stderr says why")
        return json.loads(line)

    def run(self, path: Path, ctf: bool) -> dict:
        self.proc.stdin.write(json.dumps({"path": str(path), "ctf": ctf}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------
# The run


def _page_cache(path: Path) -> None:
    """The movie's file read once, so neither method pays for the disk (both read it from the cache)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _summary(runs: list[dict]) -> dict:
    out = {
        "wall_s": _median([r["wall_s"] for r in runs]),
        "cpu_s": _median([r["cpu_s"] for r in runs]),
        "wall_s_each": [r["wall_s"] for r in runs],
        "drift_rms_error_px_each": [r["drift_rms_error_px"] for r in runs],
        "drift_rms_error_px_max": max(r["drift_rms_error_px"] for r in runs),
        "peak_rss_MiB": max(r["peak_rss_MiB"] for r in runs),
    }
    if "stages_wall_s" in runs[0]:
        for key in ("stages_wall_s", "stages_cpu_s"):
            out[key] = {k: _median([r[key][k] for r in runs]) for k in runs[0][key]}
    return out


def measure_size(name: str, folder: Path, movies: int, frames: int, tiff: bool = False) -> dict:
    shape = SIZES[name]
    paths = [write_movie(folder, shape, frames, seed) for seed in range(movies)]
    tiff_path = lzw_tiff(paths[0]) if tiff else None
    ctf = name == "4096"
    ours, plain = Worker("ours"), Worker("plain")
    runs: dict[str, list[dict]] = {"ours": [], "plain": []}
    loads = []
    try:
        for k, path in enumerate(paths):
            order = (ours, plain) if k % 2 == 0 else (plain, ours)
            for w in order:
                _page_cache(path)
                load = os.getloadavg()
                loads.append(round(load[0], 2))
                out = w.run(path, ctf and w.kind == "ours")
                runs[w.kind].append(out | {"movie": path.name, "load_1min": round(load[0], 2)})
                print(f"  {name} {path.name} {w.kind}: {out['wall_s']} s wall, {out['cpu_s']} s CPU, "
                      f"error {out['drift_rms_error_px']} px, load {load[0]:.1f}", flush=True)  # fmt: skip
        if tiff_path is not None:  # ours on the same movie compressed: reading is decompressing
            _page_cache(tiff_path)
            load = os.getloadavg()
            lzw = ours.run(tiff_path, False) | {"movie": tiff_path.name, "load_1min": round(load[0], 2)}
            print(f"  {name} {tiff_path.name} ours: {lzw['wall_s']} s wall, read {lzw['stages_wall_s']['read']} s",
                  flush=True)  # fmt: skip
    finally:
        ours.close()
        plain.close()
    result = {
        "shape": [frames, *shape],
        "ours": _summary(runs["ours"]),
        "plain": _summary(runs["plain"]),
        "runs": runs,
        "load_1min": {"min": min(loads), "max": max(loads), "each": loads},
    }
    o, p = result["ours"], result["plain"]
    result["ratio_plain_over_ours_wall"] = round(p["wall_s"] / o["wall_s"], 2)
    result["ratio_plain_over_ours_cpu"] = round(p["cpu_s"] / o["cpu_s"], 2)
    with_writes = _median([r["wall_s"] + r["stages_wall_s"]["writes"] for r in runs["ours"]])
    result["ratio_plain_over_ours_with_writes_wall"] = round(p["wall_s"] / with_writes, 2)
    if tiff_path is not None:
        result["ours_on_lzw_tiff"] = lzw | {"note": "the first movie as an LZW-compressed TIFF (SerialEM's "
                                            "compressed frames): the read stage is the decompression"}  # fmt: skip
    if ctf:
        ctfs = [r["ctf"] for r in runs["ours"]]
        result["ctf"] = {
            "wall_s": _median([c["wall_s"] for c in ctfs]),
            "cpu_s": _median([c["cpu_s"] for c in ctfs]),
            "defocus_error_pct_max": max(c["defocus_error_pct"] for c in ctfs),
        }
        result["mc_plus_ctf_s_per_exposure"] = _median(
            [r["wall_s"] + r["ctf"]["wall_s"] for r in runs["ours"]]
        )
        result["mc_plus_writes_plus_ctf_s_per_exposure"] = _median(
            [r["wall_s"] + r["stages_wall_s"]["writes"] + r["ctf"]["wall_s"] for r in runs["ours"]]
        )
    return result


def _table(results: dict) -> str:
    lines = [
        f"{'size':>6} {'ours s':>7} {'plain s':>8} {'ratio':>6} {'ours err':>9} {'plain err':>10} {'load':>9}  "
        "ours stages wall s (read/gain/align/patches/sum/writes)"
    ]
    for name, r in results["sizes"].items():
        st = r["ours"]["stages_wall_s"]
        stages = "/".join(
            f"{st[k]:.2f}" for k in ("read", "gain_defects", "alignment", "patches", "sum", "writes")
        )
        load = f"{r['load_1min']['min']:.1f}-{r['load_1min']['max']:.1f}"
        lines.append(
            f"{name:>6} {r['ours']['wall_s']:>7.2f} {r['plain']['wall_s']:>8.2f} "
            f"{r['ratio_plain_over_ours_wall']:>6.2f} {r['ours']['drift_rms_error_px_max']:>9.4f} "
            f"{r['plain']['drift_rms_error_px_max']:>10.4f} {load:>9}  {stages}"
        )
    return "\n".join(lines)


def history_entry(size: str, measured: dict) -> dict:
    """One size of one invocation, as ``history`` keeps it: every run's figures, so the file shows the spread
    over runs and days, not the last (or the best)."""
    from bench.record import processor

    entry = {
        "size": size,
        "measured": measured["measured"],
        "cpu": processor(),
        "load_1min": measured["load_1min"],
        "ours_wall_s": measured["ours"]["wall_s"],
        "plain_wall_s": measured["plain"]["wall_s"],
        "ratio_plain_over_ours_wall": measured["ratio_plain_over_ours_wall"],
        "ours_drift_rms_error_px_max": measured["ours"]["drift_rms_error_px_max"],
    }
    if "mc_plus_ctf_s_per_exposure" in measured:
        entry["mc_plus_ctf_s_per_exposure"] = measured["mc_plus_ctf_s_per_exposure"]
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_motion")
    p.add_argument("--worker", choices=["ours", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--generate", action="store_true", help="only write the movies")
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--movies", type=int, default=3)
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--movie-dir", help="keep the movies here (default: a temporary folder, removed)")
    p.add_argument("--merge", action="store_true", help="keep the other sizes of bench/results/motion.json")
    p.add_argument("--tiff-sizes", nargs="*", default=["4096"], choices=list(SIZES),
                   help="sizes whose first movie ours also reads as LZW TIFF")  # fmt: skip
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    folder = Path(a.movie_dir) if a.movie_dir else Path(tempfile.mkdtemp(prefix="bench-motion-"))
    try:
        if a.generate:
            for size in a.sizes:
                for seed in range(a.movies):
                    t = time.perf_counter()
                    path = write_movie(folder, SIZES[size], a.frames, seed)
                    print(f"{path} {time.perf_counter() - t:.1f} s", flush=True)
            return 0
        results = {
            "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
            "movies_per_size": a.movies,
            "targets": TARGETS,
            "sizes": {},
        }
        previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        if a.merge:  # the other sizes of the last run kept, each with its own date
            results["sizes"] = previous.get("sizes", {})
        for size in a.sizes:
            print(f"=== {size} ===", flush=True)
            results["sizes"][size] = measure_size(size, folder, a.movies, a.frames, size in a.tiff_sizes) | {
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            }
            if not a.movie_dir:  # a temporary folder: at most one size's movies on disk (K3: 5.7 GB)
                ny, nx = SIZES[size]
                for path in folder.glob(f"movie_{a.frames}x{ny}x{nx}_s*"):  # the .lzw.tif copy too
                    path.unlink()
        results["machine"]["load_average_at_end"] = list(os.getloadavg())
        if "4096" in results["sizes"]:
            results["mc_plus_ctf_s_per_4096_exposure"] = results["sizes"]["4096"][
                "mc_plus_ctf_s_per_exposure"
            ]
        results["history"] = [
            *previous.get("history", []),
            *(history_entry(size, results["sizes"][size]) for size in a.sizes),
        ]
        print(_table(results))
        from bench.record import record

        record("motion", results)
    finally:
        if not a.movie_dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
