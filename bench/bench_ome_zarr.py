"""Benchmark: multiscale OME-Zarr conversion throughput and peak memory.

A synthetic EM-like uint16 volume (smooth structure + noise) is written once to an MRC file in a
scratch folder and read lazily through a numpy memmap into a dask array (so the source is on disk, not
in RAM). The same dask array is then converted, each writer in its own subprocess, by

* ``em_platform``       -- :func:`em_platform.imaging.ome_zarr.write_ome_zarr` (mean pyramid),
* ``write_image``       -- ``ome_zarr.writer.write_image`` with its defaults (resize pyramid),
* ``write_image_mean``  -- ``write_image`` with ``method=local_mean`` and our pyramid's factors,
* ``plain_zarr``        -- a single-level zarr array (``dask.array.store``), no pyramid,

all with the same chunks and the same Blosc/Zstd codec, on dask's threaded scheduler. Throughput is MB
of *input* per second of wall time (imports excluded, metadata included). CPU seconds (user + system
of the subprocess) are reported too: on a shared machine they vary less than wall time.

Memory: "peak RSS" is the subprocess's ``VmHWM``. It includes the source file's pages while they are
mapped: the memmap is opened afresh for every block read and closed after it, so they do not pile up,
but a block read maps far more than the block (a 256-voxel row segment touches whole pages, and the
kernel maps pages around each fault). "anon" is the largest anonymous RSS (sampled every 20 ms): the
memory the writer itself holds.

Fairness: before every run the previous output is deleted, dirty pages are flushed (``sync``) and
the source file is read once, so each writer starts with the source in the page cache (``--cold``
evicts it instead) and no writeback of another run competes with it. Runs are interleaved
(``--repeats``) and the median is reported.

    python -m bench.bench_ome_zarr                # 2 GiB, prints a table, writes bench/results/ome_zarr.json
    python -m bench.bench_ome_zarr --gib 0.05     # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "ome_zarr.json"
WRITERS = ("plain_zarr", "em_platform", "write_image", "write_image_mean")
BASELINE = "write_image"
VOXEL_NM = (8.0, 4.0, 4.0)  # FIB-SEM-like: z twice the y/x voxel size
CHUNKS = (64, 128, 128)  # the writer's default for this voxel size
SOURCE_CHUNKS = (64, 256, 256)  # how a reader would hand the volume over: 8 MiB blocks
PLANE = 2048


# ----------------------------------------------------------------------------------------------------
# The source volume


def volume_shape(gib: float) -> tuple[int, int, int]:
    """(z, 2048, 2048) uint16 of about ``gib`` GiB."""
    z = max(1, round(gib * 2**30 / (PLANE * PLANE * 2)))
    return (z, PLANE, PLANE)


def make_source(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Write an EM-like uint16 MRC volume slab by slab (never whole in memory).

    Two smooth random 2-D fields (feature sizes ~48 px and ~12 px) drift slowly through z, like
    organelles and membranes cut by successive sections, on a background of 5000 counts; Gaussian noise
    with sigma 150 counts stands in for shot noise.
    """
    import mrcfile
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    pad = 256
    fields = []
    for cell, amp in ((48, 900.0), (12, 500.0)):
        coarse = rng.standard_normal(((ny + pad) // cell + 4, (nx + pad) // cell + 4)).astype(np.float32)
        f = ndimage.zoom(coarse, cell, order=3)[: ny + pad, : nx + pad]
        fields.append((f * (amp / f.std())).astype(np.float32))
    tmp = path.with_suffix(".tmp")
    with mrcfile.new_mmap(str(tmp), shape=shape, mrc_mode=6, overwrite=True) as mrc:
        mrc.voxel_size = tuple(v * 10.0 for v in VOXEL_NM[::-1])  # x, y, z in angstrom
        for z in range(nz):
            img = rng.standard_normal((ny, nx), dtype=np.float32)
            img *= 150.0
            img += 5000.0
            for k, f in enumerate(fields):
                oy = int(pad / 2 + (pad / 2 - 1) * np.sin(z / (40.0 + 17 * k)))
                ox = int(pad / 2 + (pad / 2 - 1) * np.cos(z / (55.0 + 11 * k)))
                img += f[oy : oy + ny, ox : ox + nx]
            np.clip(img, 0, 65535, out=img)
            mrc.data[z] = img.astype(np.uint16)
    tmp.rename(path)


class MemmapVolume:
    """Array-like over a raw block of a file: every read maps the file, copies the slice and unmaps."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self.offset = str(path), tuple(shape), np.dtype(dtype), offset
        self.ndim = len(shape)

    def __getitem__(self, key):
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        try:
            return np.array(mm[key])
        finally:
            del mm


def open_source(path: Path):
    """The MRC volume as a dask array read lazily through a numpy memmap."""
    import dask.array as da
    import mrcfile

    with mrcfile.open(str(path), header_only=True, permissive=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        offset = h.nbytes + int(h.nsymbt)
    vol = MemmapVolume(path, shape, np.dtype("<u2"), offset)
    chunks = tuple(min(c, n) for c, n in zip(SOURCE_CHUNKS, shape, strict=True))
    return da.from_array(vol, chunks=chunks, asarray=False, fancy=False, name="mrc-source")


# ----------------------------------------------------------------------------------------------------
# One writer run (in a subprocess)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _write(writer: str, src, out: str) -> None:
    import dask.array as da
    import zarr

    from em_platform.imaging.ome_zarr import blosc_codec, write_ome_zarr

    codec = blosc_codec(src.dtype)
    units = ("nanometer",) * 3
    if writer == "em_platform":
        write_ome_zarr(src, out, axes=("z", "y", "x"), scale=VOXEL_NM, units=units, chunks=CHUNKS)
    elif writer == "plain_zarr":
        arr = zarr.create_array(
            out,
            shape=src.shape,
            dtype=src.dtype,
            chunks=CHUNKS,
            compressors=codec,
            fill_value=0,
            zarr_format=3,
        )
        da.store(src, arr, lock=False)
    elif writer in ("write_image", "write_image_mean"):
        from ome_zarr.scale import Methods
        from ome_zarr.writer import write_image

        kwargs = {}
        if writer == "write_image_mean":
            from em_platform.imaging.pyramid import plan_pyramid

            plan = plan_pyramid(src.shape, "zyx", VOXEL_NM)
            factors = [1, 1, 1]
            kwargs["scale_factors"] = []
            for lv in plan[1:]:
                factors = [a * b for a, b in zip(factors, lv.factors, strict=True)]
                kwargs["scale_factors"].append(dict(zip("zyx", factors, strict=True)))
            kwargs["method"] = Methods.LOCAL_MEAN
        write_image(
            src,
            out,
            axes=["z", "y", "x"],
            scale=dict(zip("zyx", VOXEL_NM, strict=True)),
            axes_units=dict(zip("zyx", units, strict=True)),
            storage_options={"chunks": CHUNKS, "compressor": codec},
            **kwargs,
        )
    else:
        raise ValueError(f"unknown writer {writer!r}; use one of {WRITERS}")


def _check(writer: str, src, out: str) -> None:
    """Spot-check level 0 against the source (untimed)."""
    import zarr

    node = zarr.open(out, mode="r")
    if isinstance(node, zarr.Group):
        key = sorted(node.array_keys())[0]
        node = node[key]
    rng = np.random.default_rng(1)
    for _ in range(4):
        start = [int(rng.integers(0, max(1, n - 64))) for n in src.shape]
        sl = tuple(slice(s, s + 64) for s in start)
        if not np.array_equal(node[sl], src[sl].compute()):
            raise AssertionError(f"{writer}: level 0 differs from the source at {sl}")


def child_main(writer: str, src_path: str, out: str) -> None:
    # Import everything a writer uses before the clock starts: imports are not conversion time (dask
    # imports distributed, if installed, on its first compute).
    import distributed  # noqa: F401
    import ome_zarr.scale  # noqa: F401
    import ome_zarr.writer  # noqa: F401

    import em_platform.imaging.ome_zarr  # noqa: F401

    src = open_source(Path(src_path))
    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _proc_status("RssAnon"))
            time.sleep(0.02)

    base_rss = _proc_status("VmRSS")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load = os.getloadavg()[0]
    c0 = os.times()
    t0 = time.perf_counter()
    _write(writer, src, out)
    seconds = time.perf_counter() - t0
    c1 = os.times()
    stop.set()
    sampler.join()
    result = {
        "writer": writer,
        "seconds": seconds,
        "cpu_seconds": (c1.user - c0.user) + (c1.system - c0.system),
        "load_average_1min_before": load,
        "input_bytes": int(src.nbytes),
        "peak_rss_bytes": _proc_status("VmHWM"),
        "peak_rss_anon_bytes": peak_anon[0],
        "rss_before_bytes": base_rss,
    }
    _check(writer, src, out)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# The driver


def _tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return len(files), sum(p.stat().st_size for p in files)


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_one(writer: str, src: Path, out: Path, cold: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    _evict(src) if cold else _warm(src)
    cmd = [sys.executable, "-m", "bench.bench_ome_zarr", "--child", writer, str(src), str(out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{writer} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["files"], result["output_bytes"] = _tree_size(out)
    shutil.rmtree(out, ignore_errors=True)
    return result


def machine_facts() -> dict:
    import dask
    import numcodecs
    import ome_zarr
    import zarr

    from bench.record import model_name

    cpu = model_name()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "zarr": zarr.__version__,
        "ome_zarr": ome_zarr.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "numcodecs": numcodecs.__version__,
    }


def _mb_s(r: dict) -> float:
    return r["input_bytes"] / r["seconds"] / 1e6


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for writer, rs in runs.items():
        rates = [_mb_s(r) for r in rs]
        out[writer] = {
            "mb_per_s": round(statistics.median(rates), 1),
            "mb_per_s_runs": [round(x, 1) for x in rates],
            "seconds": round(statistics.median(r["seconds"] for r in rs), 2),
            "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in rs), 1),
            "mb_per_cpu_s": round(
                statistics.median(r["input_bytes"] / r["cpu_seconds"] / 1e6 for r in rs), 1
            ),
            "peak_rss_mib": round(max(r["peak_rss_bytes"] for r in rs) / 2**20),
            "peak_rss_anon_mib": round(max(r["peak_rss_anon_bytes"] for r in rs) / 2**20),
            "rss_before_mib": round(max(r["rss_before_bytes"] for r in rs) / 2**20),
            "files": rs[-1]["files"],
            "output_mib": round(rs[-1]["output_bytes"] / 2**20),
        }
    return out


def print_table(summary: dict[str, dict], input_bytes: int) -> None:
    print(f"\nOME-Zarr conversion of {input_bytes / 2**30:.2f} GiB uint16 (MB = 1e6 bytes of input)")
    head = (
        f"{'writer':<18}{'MB/s':>8}{'s':>8}{'CPU s':>8}{'MB/CPU-s':>10}{'peak RSS MiB':>14}{'(anon)':>8}"
        f"{'files':>7}{'out MiB':>9}  MB/s of each run"
    )
    print(head)
    print("-" * len(head))
    for w, s in summary.items():
        print(
            f"{w:<18}{s['mb_per_s']:>8.1f}{s['seconds']:>8.1f}{s['cpu_seconds']:>8.1f}{s['mb_per_cpu_s']:>10.1f}"
            f"{s['peak_rss_mib']:>14}"
            f"{s['peak_rss_anon_mib']:>8}{s['files']:>7}{s['output_mib']:>9}  {s['mb_per_s_runs']}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="source volume size in GiB (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per writer (median reported)")
    p.add_argument("--writers", default=",".join(WRITERS), help=f"comma-separated subset of {WRITERS}")
    p.add_argument("--cold", action="store_true", help="evict the source from the page cache before each run")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (source volume)")
    p.add_argument("--output", default=str(RESULTS), help="results JSON path")
    p.add_argument("--child", nargs=3, metavar=("WRITER", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0

    writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    for w in writers:
        if w not in WRITERS:
            p.error(f"unknown writer {w!r}; use some of {', '.join(WRITERS)}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="em_bench_omz_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shape = volume_shape(args.gib)
    src = work / f"source_{'x'.join(map(str, shape))}.mrc"
    try:
        if not src.exists():
            t = time.perf_counter()
            make_source(src, shape)
            print(f"source {shape} uint16 written in {time.perf_counter() - t:.1f} s: {src}")
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {w: [] for w in writers}
        for rep in range(args.repeats):
            for w in writers:
                r = run_one(w, src, work / f"out_{w}.zarr", args.cold)
                runs[w].append(r)
                print(
                    f"  run {rep + 1} {w:<18} {_mb_s(r):7.1f} MB/s  {r['seconds']:6.1f} s  "
                    f"CPU {r['cpu_seconds']:6.1f} s  peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  "
                    f"(load {r['load_average_1min_before']:.1f})",
                    flush=True,
                )
        summary = summarise(runs)
        input_bytes = runs[writers[0]][0]["input_bytes"]
        print_table(summary, input_bytes)
        ratios: dict[str, float] = {}
        cpu_ratios: dict[str, float] = {}
        if "em_platform" in summary:
            ours = summary["em_platform"]
            for other in writers:
                if other != "em_platform":
                    ratios[f"em_platform/{other}"] = round(ours["mb_per_s"] / summary[other]["mb_per_s"], 2)
                    cpu_ratios[f"em_platform/{other}"] = round(
                        ours["mb_per_cpu_s"] / summary[other]["mb_per_cpu_s"], 2
                    )
            for k, v in ratios.items():
                print(f"{k}: {v:.2f}x throughput, {cpu_ratios[k]:.2f}x MB per CPU-second")
        targets = {}
        if "em_platform" in summary:
            if "write_image" in summary:
                targets["em_platform/write_image >= 3"] = ratios["em_platform/write_image"] >= 3
            if "plain_zarr" in summary:
                targets["em_platform/plain_zarr >= 0.5"] = ratios["em_platform/plain_zarr"] >= 0.5
            targets["em_platform peak RSS < 1 GiB"] = summary["em_platform"]["peak_rss_mib"] < 1024
        for k, v in targets.items():
            print(f"target {k}: {'met' if v else 'NOT met'}")
        doc = {
            "benchmark": "ome_zarr_conversion",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_facts(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "input": {
                "shape": list(shape),
                "dtype": "uint16",
                "bytes": input_bytes,
                "voxel_size_nm": list(VOXEL_NM),
                "source": "MRC file on local disk, read through numpy memmap -> dask",
                "source_chunks": list(SOURCE_CHUNKS),
                "page_cache": "cold (evicted before each run)"
                if args.cold
                else "warm (read before each run)",
            },
            "chunks": list(CHUNKS),
            "codec": "blosc(cname=zstd, clevel=1, bitshuffle) for every writer",
            "scheduler": "dask threaded scheduler: em_platform its default of 2 threads per core, the "
            "others dask's default of 1 per core (they gain nothing from more; MB per CPU-second is "
            "independent of the thread count)",
            "repeats": args.repeats,
            "writers": summary,
            "ratios": ratios,
            "ratios_mb_per_cpu_s": cpu_ratios,
            "targets": targets,
            "runs": runs,
        }
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
