"""Run inside abTEM's own environment (bench/bench_simulation.py makes it): the projected potential of the
atoms in an .npz, as abTEM computes it ("infinite" projection of the chosen parametrization), to an .npy.

    python bench/abtem_projection.py atoms.npz out.npy peng

The .npz holds `symbols` (n,), `positions` (n, 3) Å in abTEM's cell, `cell` (3,) Å and `gpts` (nx, ny); the
.npy is (ny, nx) in V·Å, rows along y like the simulator's images.
"""

import sys

import abtem
import ase
import numpy as np


def main(src: str, dst: str, parametrization: str) -> None:
    d = np.load(src)
    atoms = ase.Atoms(symbols=[str(s) for s in d["symbols"]], positions=d["positions"], cell=d["cell"])
    potential = abtem.Potential(
        atoms,
        gpts=tuple(int(g) for g in d["gpts"]),
        projection="infinite",
        parametrization=parametrization,
        slice_thickness=float(d["cell"][2]),
    )
    array = potential.build().compute(progress_bar=False).array  # (slices, x, y)
    np.save(dst, array.sum(axis=0).T.astype(np.float64))


if __name__ == "__main__":
    main(*sys.argv[1:4])
