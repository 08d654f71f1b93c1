"""The demo's simulation spec (also the README's example): a few seconds to simulate on 2 cores, and a size
(512²) at which every cryo check passes (at 256² × 3 e/Å² the Thon rings hold too little
signal for a 1 % defocus)."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEMO_SPEC_NAME = "demo_apoferritin"

DEMO_SPEC = """\
# A small cryo-ET tilt series: 8 apoferritins and 13 gold beads in 40 nm of ice.
name: demo_apoferritin
num_stacks: 1
seed: 7
apix: 0.4                     # nm per pixel at the specimen (ETSimulations' apix)
defocus_values: [3.0]         # µm, positive = underfocus, round-robin over stacks
bead_occupancy: 0.004         # volume fraction of gold beads (5 nm radius)
particles:
  - model: apoferritin_6z6u   # built in (PDB 6Z6U); or a .pdb/.cif(.gz)/.mrc path relative to this file
    count: 8
sample: {thickness: 40, ice: water}
geometry: {tilt_scheme: dose_symmetric, theta_start: -60, theta_incr: 6, ntilts: 21, tilt_axis: 85.0}
electronbeam: {acc_voltage: 300, dose_per_tilt: 3.0}
optics: {cs: 2.7, amplitude_contrast: 0.07}
detector: {det_pix_x: 512, det_pix_y: 512, dqe: 0.8}
movies: {frames: 5, drift: 2.0}
"""


def write_demo_spec(folder: Path) -> Path | None:
    """Write the demo spec into ``folder`` once (atomically, dated a minute back so it counts as settled)."""
    path = folder / f"{DEMO_SPEC_NAME}.yaml"
    if path.exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(DEMO_SPEC)
    then = time.time() - 60
    os.utime(tmp, (then, then))
    os.replace(tmp, path)
    return path
