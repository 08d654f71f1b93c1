"""CTF phase flipping of one tilted view (em_platform.cryo.ctf_correction.phase_flip) against the literal
strip-by-strip scheme in double precision (tests/cryo/synthetic.phase_flip_by_definition: a whole-plane FFT
flip with each strip's own CTF, the implementation before this one), in the same run.

A ``--size``² float32 view (default 2048²) at 2 Å/px is flipped at 0°, 30° and 60° (strips of 200 Å defocus
tolerance: the more tilt, the more strips), each ``--rounds`` times alternating; the median counts.

    python -m bench.bench_phase_flip          # writes bench/results/phase_flip.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from em_platform.cryo.ctf_correction import phase_flip, strip_width_px
from em_platform.cryo.optics import CTFParams, Microscope
from tests.cryo.synthetic import phase_flip_by_definition

OUT = Path(__file__).resolve().parent / "results" / "phase_flip.json"
PIXEL_A = 2.0


def _seconds(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    scope = Microscope()
    params = CTFParams(32000.0, 30500.0, 37.0)
    view = (np.random.default_rng(0).normal(size=(args.size, args.size)) * 10 + 100).astype(np.float32)
    tilts = {}
    for tilt in (0.0, 30.0, 60.0):
        ours, reference = [], []
        for _ in range(args.rounds):
            ours.append(_seconds(phase_flip, view, PIXEL_A, params, tilt, scope))
            reference.append(_seconds(phase_flip_by_definition, view, PIXEL_A, params, tilt, scope))
        width = strip_width_px(tilt, PIXEL_A, args.size, 200.0)
        tilts[f"{tilt:g}"] = {
            "strips": -(-args.size // width),
            "phase_flip_s": round(statistics.median(ours), 3),
            "by_definition_s": round(statistics.median(reference), 3),
            "speedup": round(statistics.median(reference) / statistics.median(ours), 1),
        }
    result = {
        "view": f"{args.size}² float32 at {PIXEL_A} Å/px, 37° astigmatism",
        "rounds": args.rounds,
        "tilts": tilts,
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
