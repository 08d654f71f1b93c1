"""What finding a live session's exposures costs as the session grows: at 1,000, 10,000 and 50,000
exposures (a frame-set mdoc and a movie file each, in one folder as SerialEM writes them), the time of

* ``cryo_sensor``'s walk of the session root (``scan_sessions`` through the watch the code server keeps
  between ticks: it names the movie sets, leaving their exposures to cryo-live), and
* cryo-live's watch (``FrameSetWatch.scan``),

each the first scan (every mdoc read once), a scan with nothing new (no folder listed again) and a scan after
one more exposure landed (the grown folder listed again, one mdoc read): the median of ``--repeats``, against
the same at 1,000 in the same run (a ratio). Writes bench/results/cryo_scan.json.

python -m bench.bench_cryo_scan
python -m bench.bench_cryo_scan --sizes 1000 10000 --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.record import RESULTS, history_stamp
from bench.scale.measure import median_seconds

NAME = "cryo_scan"
REPEATS = 5
MDOC = "PixelSpacing = 1.0\nVoltage = 300\n\n[FrameSet = 0]\nNumSubFrames = 40\nSubFramePath = X:\\s\\{m}\n"


def _grow(folder: Path, start: int, stop: int) -> None:
    for i in range(start, stop):
        movie = f"FoilHole_{i:06d}_Data_fractions.tiff"
        (folder / movie).write_bytes(b"II*\0")
        (folder / f"{movie}.mdoc").write_text(MDOC.format(m=movie))


def _scans(scan, grow) -> dict[str, float]:
    """The first scan, a scan with nothing new, and one after an exposure landed (``grow``), in seconds."""
    t = time.perf_counter()
    scan()
    first = round(time.perf_counter() - t, 4)
    idle = median_seconds(scan, REPEATS)
    grown = []
    for _ in range(REPEATS):
        grow()
        t = time.perf_counter()
        scan()
        grown.append(time.perf_counter() - t)
    return {"first": first, "nothing_new": idle, "one_new": round(statistics.median(grown), 4)}


def measure(sizes: list[int]) -> list[dict]:
    from em_platform.cryo import session as sess
    from em_platform.cryo.frame_sets import FrameSetWatch

    points = []
    with tempfile.TemporaryDirectory(prefix="cryo-scan-") as tmp:
        root = Path(tmp) / "sessions"
        folder = root / "krios1" / "grid1"
        folder.mkdir(parents=True)
        have = 0

        def grow() -> None:
            nonlocal have
            _grow(folder, have, have + 1)
            have += 1

        for n in sizes:
            _grow(folder, have, n)
            have = n
            sensor_watch = FrameSetWatch(root, "sessions", aliases=True)  # the code server's, a new one
            sensor = _scans(partial(sess.scan_sessions, root, "sessions", sensor_watch), grow)
            watch = _scans(FrameSetWatch(root, "sessions").scan, grow)
            point = {
                "exposures": n,
                "seconds": {
                    **{f"sensor_tick_{k}": v for k, v in sensor.items()},
                    **{f"watch_scan_{k}": v for k, v in watch.items()},
                },
            }
            print(json.dumps(point), flush=True)
            points.append(point)
    base = points[0]["seconds"]
    for p in points:
        p["over_smallest"] = {k: round(v / max(base[k], 1e-6), 1) for k, v in p["seconds"].items()}
    return points


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    run = {**history_stamp(), "points": measure(sorted(args.sizes))}
    if not args.no_record:
        path = RESULTS / f"{NAME}.json"
        history = json.loads(path.read_text()).get("history", []) if path.exists() else []
        doc = {"benchmark": NAME, "date": run["measured"], "latest": run, "history": [*history, run]}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"recorded {path}")
    return run


if __name__ == "__main__":
    main()
