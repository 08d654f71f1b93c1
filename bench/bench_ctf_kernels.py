"""The two CTF kernels a tilt series spends its time in, each against its literal form in the same run.

* Phase flipping of one tilted view (em_platform.cryo.ctf_correction.phase_flip) against the strip-by-strip
  scheme in double precision (tests/cryo/synthetic.phase_flip_by_definition: a whole-plane FFT flip with each
  strip's own CTF, the implementation before this one). A ``--size``² float32 view (default 2048²) at 2 Å/px
  is flipped at 0°, 30° and 60° (strips of 200 Å defocus tolerance: the more tilt, the more strips).
* The score the defocus fits evaluate hundreds of times per tilt, a spectrum's normalised CC with CTF²
  (em_platform.cryo.optics.ThonRings.correlation), against its literal form
  (tests/cryo/synthetic.ctf_correlation_by_definition), on the fit band of a 512² spectrum at 1.35 Å/px.

Each is timed ``--rounds`` times alternating; the median counts.

    python -m bench.bench_ctf_kernels          # writes bench/results/ctf_kernels.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from bench.record import record
from em_platform.cryo.ctf_correction import phase_flip, strip_width_px
from em_platform.cryo.optics import (
    CTFParams,
    Microscope,
    ThonRings,
    frequency_grid,
)
from tests.cryo.synthetic import ctf_correlation_by_definition, phase_flip_by_definition

PIXEL_A = 2.0


def _seconds(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _thon_rings(scope: Microscope, rounds: int, evaluations: int = 200) -> dict:
    k, az = frequency_grid((512, 512), 1.35)
    band = (k > 1 / 30) & (k < 1 / 4) & (np.fft.fftfreq(512)[None, :] >= 0)  # a fit's band, half plane
    k, az = k[band], az[band]
    spectrum = np.random.default_rng(1).normal(size=k.size)
    spectrum -= spectrum.mean()
    spectrum /= np.sqrt((spectrum * spectrum).sum())
    rings = ThonRings(k, az, scope)
    params = CTFParams(32000.0, 31000.0, 20.0)

    def direct() -> None:
        for _ in range(evaluations):
            ctf_correlation_by_definition(spectrum, k, az, params, scope)

    def ours() -> None:
        for _ in range(evaluations):
            rings.correlation(spectrum, params)

    a, b = [], []
    for _ in range(rounds):
        a.append(_seconds(ours))
        b.append(_seconds(direct))
    return {
        "pixels": int(k.size),
        "thon_rings_ms": round(1000 * statistics.median(a) / evaluations, 3),
        "direct_ms": round(1000 * statistics.median(b) / evaluations, 3),
        "speedup": round(statistics.median(b) / statistics.median(a), 1),
    }


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
    record(
        "ctf_kernels",
        {
            "phase_flip": {
                "view": f"{args.size}² float32 at {PIXEL_A} Å/px, 37° astigmatism",
                "tilts": tilts,
            },
            "thon_rings": _thon_rings(scope, args.rounds),
            "rounds": args.rounds,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
