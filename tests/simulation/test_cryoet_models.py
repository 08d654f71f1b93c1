"""Particle models from files other than the shipped PDB: an mmCIF of the same structure, and an MRC potential map.

Each is loaded through the public path (a spec naming the file, :func:`load_library`) and checked against
numbers computed here independently: the PDB file's own ATOM/HETATM records, and the closed-form projection
of Gaussian blobs of potential.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest

from em_platform import simulation
from em_platform.simulation.cryoet.assembly import PlacedParticle, Sample
from em_platform.simulation.cryoet.image_formation import Grid, Ice, Optics, TiltGeometry, TiltImager
from em_platform.simulation.cryoet.models import ModelError, load_library
from em_platform.simulation.cryoet.scene import build_scene
from em_platform.simulation.cryoet.spec import load_spec

PDB = Path(simulation.__file__).parent / "data" / "6z6u.pdb.gz"
OPTICS = Optics(300, 2.7, 2.7, 0.8, 0.02, 0, 3.0, 0.07)


def _spec(folder: Path, *particles: str):
    lines = ["name: models", "particles:"]
    for p in particles:
        lines += [f"  - {p}"]
    path = folder / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_spec(path)


def _projection(model, pixel_A: float, n: int, angle_deg: float = 0.0) -> np.ndarray:
    """Projected potential (V·Å) of one particle at the specimen centre, in vacuum, on an n² image."""
    size = n * pixel_A / 10
    sample = Sample((size, size, size), [PlacedParticle(0, model.name, np.zeros(3), np.eye(3))], [])
    scene = build_scene(sample, {model.name: model}, in_ice=False)
    grid = Grid(n, n, 16, pixel_A)
    imager = TiltImager(scene, grid, OPTICS, Ice("none", 300.0, math.inf), 1e4)
    geo = TiltGeometry(angle_deg, 0, (0, 0), 1e4, 1e4, 0, 0)
    return grid.crop(sum(imager.slab_potentials(geo, np.random.default_rng(0))[0]))


def _pdb_atoms(path: Path) -> tuple[list[str], np.ndarray]:
    """Elements and (x, y, z) of the first model's ATOM/HETATM records, read from the fixed PDB columns."""
    elements, xyz = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith("ENDMDL"):
                break
            if line.startswith(("ATOM  ", "HETATM")):
                xyz.append((float(line[30:38]), float(line[38:46]), float(line[46:54])))
                elements.append(line[76:78].strip().upper())
    return elements, np.asarray(xyz)


@pytest.mark.parametrize("name", ["ferritin.cif", "ferritin.cif.gz"])
def test_mmcif_gives_the_atoms_and_potential_of_the_pdb(tmp_path, name):
    st = gemmi.read_structure(str(PDB))
    st.setup_entities()
    text = st.make_mmcif_document().as_string()
    cif = tmp_path / name
    cif.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    (tmp_path / "ferritin.pdb.gz").write_bytes(PDB.read_bytes())
    library = load_library(
        _spec(tmp_path, "{model: ferritin.pdb.gz, name: pdb}", f"{{model: {name}, name: cif}}")
    )
    pdb, mmcif = library["pdb"], library["cif"]
    assert mmcif.source == str(cif)

    # the atoms, against the PDB file's own records: count, elements, centroid in the bounding-box frame
    elements, xyz = _pdb_atoms(PDB)
    assert mmcif.n_points == pdb.n_points == len(elements) == 32618
    cif_elements = np.char.upper(np.asarray(mmcif.kinds))[mmcif.kind_index]
    for e in set(elements):
        assert np.count_nonzero(cif_elements == e) == elements.count(e), e
    centre = 0.5 * (xyz.min(axis=0) + xyz.max(axis=0))
    np.testing.assert_allclose(mmcif.coords.mean(axis=0), (xyz - centre).mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(mmcif.coords, pdb.coords, atol=1e-3)
    assert mmcif.radius_A == pytest.approx(pdb.radius_A, abs=1e-3)
    assert mmcif.volume_A3 == pytest.approx(pdb.volume_A3, rel=1e-6)  # same mass, same excluded volume

    # and what the microscope sees: the same projected potential, untilted and at 30°
    for angle in (0.0, 30.0):
        a, b = _projection(pdb, 2.0, 96, angle), _projection(mmcif, 2.0, 96, angle)
        assert a.max() > 10.0  # a protein, not an empty image
        np.testing.assert_allclose(b, a, atol=1e-3 * a.max())


# Gaussian blobs of potential: (x, y, z) centre in Å from the map centre, σ in Å, peak in V
BLOBS = [((-9.0, -5.5, 4.0), 3.0, 20.0), ((8.5, 7.0, -3.0), 4.0, 12.0)]
VOXEL_A = 1.1


def _blob_map(n: int = 56) -> np.ndarray:
    """(z, y, x) float32 volume in V on VOXEL_A voxels, centre at index (n − 1)/2."""
    r = (np.arange(n) - (n - 1) / 2) * VOXEL_A
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    vol = np.zeros((n, n, n))
    for (bx, by, bz), s, v in BLOBS:
        vol += v * np.exp(-((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _write_map(path: Path, data: np.ndarray, voxel: float) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel


def _blob_projection(n: int, pixel: float, offset_A: np.ndarray) -> np.ndarray:
    """Closed form: a 3-D Gaussian of peak v and width σ projects to v·σ·√(2π)·exp(−ρ²/2σ²) (V·Å).

    ``offset_A`` is where the map's centre lands in the image (x, y, Å from pixel (n//2, n//2))."""
    yy, xx = (np.mgrid[0:n, 0:n] - n // 2) * pixel
    out = np.zeros((n, n))
    for (bx, by, _), s, v in BLOBS:
        rho2 = (xx - bx - offset_A[0]) ** 2 + (yy - by - offset_A[1]) ** 2
        out += v * s * math.sqrt(2 * math.pi) * np.exp(-rho2 / (2 * s * s))
    return out


def test_mrc_map_projects_to_its_potential_at_its_voxel_size(tmp_path):
    data = _blob_map()
    _write_map(tmp_path / "blobs.mrc", data, VOXEL_A)
    # the same map with a wrong header voxel size, corrected in the spec
    _write_map(tmp_path / "wrong_header.mrc", data, 5.0)
    library = load_library(
        _spec(tmp_path, "{model: blobs.mrc}", "{model: wrong_header.mrc, map_voxel_size: 1.1}")
    )
    model = library["blobs"]
    assert not model.is_atomic and model.kinds == ("map",)

    # points on the map's voxel lattice, carrying V·Å³: the kept voxels (above 1 % of the peak) exactly
    kept = data > 0.01 * data.max()
    assert model.n_points == np.count_nonzero(kept)
    steps = np.diff(np.unique(np.round(model.coords[:, 0], 4)))
    np.testing.assert_allclose(steps, VOXEL_A, rtol=1e-4)
    assert float(model.weights.sum()) == pytest.approx(float(data[kept].sum()) * VOXEL_A**3, rel=1e-5)

    # the model frame is centred on the box of the kept voxels: where the map's centre lands
    iz, iy, ix = np.nonzero(kept)
    box_centre = np.array([ix.min() + ix.max(), iy.min() + iy.max(), iz.min() + iz.max()]) / 2
    offset = -(box_centre - (data.shape[0] - 1) / 2) * VOXEL_A

    # imaged on 2.2 Å pixels (two voxels each): the closed-form projection of the blobs
    pixel, n = 2 * VOXEL_A, 64
    image = _projection(model, pixel, n)
    expected = _blob_projection(n, pixel, offset)
    peak = expected.max()
    assert image.sum() * pixel**2 == pytest.approx(float(model.weights.sum()), rel=1e-4)
    assert np.abs(image - expected).max() < 0.02 * peak  # the tails under 1 % of the peak are dropped
    assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.999  # 0.97 if the voxel were 1 Å
    # map_voxel_size overrides the header: the same particle as the correctly labelled map
    fixed = library["wrong_header"]
    np.testing.assert_allclose(fixed.coords, model.coords, atol=1e-4)
    np.testing.assert_allclose(fixed.weights, model.weights, rtol=1e-5)


def test_map_without_a_voxel_size_fails_naming_the_field(tmp_path):
    _write_map(tmp_path / "novox.mrc", _blob_map(24), 0.0)
    with pytest.raises(
        ModelError, match=r"particles\[0\].model: .*novox.mrc has no voxel size.*map_voxel_size"
    ):
        load_library(_spec(tmp_path, "{model: novox.mrc}"))
    # and with the field set, it loads at that size
    model = load_library(_spec(tmp_path, "{model: novox.mrc, map_voxel_size: 2.5}"))["novox"]
    steps = np.diff(np.unique(np.round(model.coords[:, 1], 4)))
    np.testing.assert_allclose(steps, 2.5, rtol=1e-4)
