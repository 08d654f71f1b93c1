"""The assembled specimen as point scatterers grouped into channels, and each channel's form factor.

A channel is a set of points that share one scattering transfer F(q) in V·Å³: the atoms of one element
of one model (the 5-Gaussian electron form factor, minus the solvent they displace), the voxels of a
map, or gold beads of one radius (a uniform sphere). Projected potential = Σ_c F_c(q) · FT(points of c)
/ pixel area, so one deposit and one FFT per channel give the exact projection-approximation potential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from em_platform.simulation.cryoet import physics
from em_platform.simulation.cryoet.assembly import Sample
from em_platform.simulation.cryoet.models import ParticleModel


@dataclass(frozen=True)
class Channel:
    kind: str  # "atom" | "map" | "bead"
    element: str | None = None  # atoms
    b_factor: float = 0.0  # Å², added to the atoms' form factor
    hydrogens: float = 0.0  # implicit bonded H per atom (models without explicit hydrogens)
    excluded_volume_A3: float = 0.0  # solvent each point displaces (0: in vacuum or for maps)
    radius_A: float = 0.0  # beads
    damaged: bool = True  # the dose B-factor applies (not to gold)

    def transfer(self, q2: np.ndarray, *, solvent_potential_V: float, damage_b: float) -> np.ndarray:
        """F(q) in V·Å³ at squared frequency q² (Å⁻²); the integral of the point's potential at q = 0."""
        b = damage_b if self.damaged else 0.0
        if self.kind == "atom":
            assert self.element is not None  # an atom channel names its element
            f = physics.POTENTIAL_CONSTANT * physics.form_factor(self.element, q2, self.b_factor + b)
            if self.hydrogens:
                f += (
                    self.hydrogens
                    * physics.POTENTIAL_CONSTANT
                    * physics.form_factor("H", q2, self.b_factor + b)
                )
            v = self.excluded_volume_A3
            if v > 0 and solvent_potential_V > 0:  # Fraser-MacRae-Suzuki Gaussian excluded volume
                f -= solvent_potential_V * v * np.exp(-math.pi * v ** (2 / 3) * q2 - b * q2 / 4)
            return f
        if self.kind == "map":
            return np.exp(-b * q2 / 4) * np.ones_like(q2)
        if self.kind == "bead":
            x = 2 * math.pi * np.sqrt(q2) * self.radius_A
            with np.errstate(invalid="ignore", divide="ignore"):
                shape = np.where(x > 1e-6, 3 * (np.sin(x) - x * np.cos(x)) / np.maximum(x, 1e-6) ** 3, 1.0)
            contrast = gold_potential_V() - solvent_potential_V
            return contrast * (4 / 3 * math.pi * self.radius_A**3) * shape
        raise ValueError(f"unknown channel kind {self.kind!r}")


def gold_potential_V() -> float:
    """Mean inner potential of gold from isolated-atom form factors (≈ 30 V)."""
    f0 = float(physics.form_factor("Au", np.zeros(1))[0])
    return physics.mean_inner_potential(physics.GOLD_ATOMS_PER_A3, f0)


def water_potential_V() -> float:
    """Mean inner potential of amorphous ice from isolated-atom form factors (≈ 4.9 V)."""
    f0 = float(physics.water_form_factor(np.zeros(1))[0])
    return physics.mean_inner_potential(physics.WATER_DENSITY_PER_A3, f0)


# Bound hydrogens per heavy atom in proteins (united-atom counts: CH/CH2/CH3, NH/NH2/NH3+, OH, SH).
# Models from cryo-EM or X-ray rarely carry hydrogens, yet H is ~8 % of a protein's mass and about a
# third of its contrast against ice; TEM-Simulator's add_hydrogen does the same job.
IMPLICIT_HYDROGENS = {"C": 1.3, "N": 1.1, "O": 0.3, "S": 0.5}

RARE_FRACTION = 0.01  # elements below this share of a model's atoms borrow a major element's channel


def fold_rare_elements(model: ParticleModel) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(channel element per kind, kind → channel element index, per-kind weight) for an atomic model.

    Every channel costs a deposit and an FFT per slab, so elements making up under 1 % of the atoms
    (ions, sulfur) scatter through the form factor of the major element whose f_e(q) is most alike in
    shape, weighted by their forward-scattering ratio f_e(0)/f_major(0). The error is below 1 % of
    those few atoms' signal at high frequency, far under 0.1 % of the image.
    """
    counts = np.bincount(model.kind_index, minlength=len(model.kinds))
    major = [k for k in range(len(model.kinds)) if counts[k] >= RARE_FRACTION * counts.sum()]
    if not major:
        major = [int(np.argmax(counts))]
    q2 = np.linspace(0, 0.5, 64) ** 2
    shapes = {k: physics.form_factor(model.kinds[k], q2) for k in range(len(model.kinds))}
    target = np.zeros(len(model.kinds), np.int64)
    weight = np.ones(len(model.kinds), np.float32)
    for k in range(len(model.kinds)):
        if k in major:
            target[k] = major.index(k)
            continue
        norm = shapes[k] / shapes[k][0]
        best = min(major, key=lambda m: float(np.sum((shapes[m] / shapes[m][0] - norm) ** 2)))
        target[k] = major.index(best)
        weight[k] = shapes[k][0] / shapes[best][0]
    return [model.kinds[m] for m in major], target, weight


@dataclass(frozen=True)
class Scene:
    """Every point of the specimen, grouped by object (particle or bead) and, within it, by channel.

    Points of object o in channel c are ``coords[ranges[o, c] : ranges[o, c + 1]]``. The multislice
    puts each object whole into the slab of its centre, as TEM-Simulator does.
    """

    channels: tuple[Channel, ...]
    coords: np.ndarray  # (n, 3) float32 (x, y, z) specimen frame, Å
    weights: np.ndarray  # (n,) float32 (1 for an atom; V·Å³ for a map voxel)
    centres: np.ndarray  # (n_objects, 3) float32
    ranges: np.ndarray  # (n_objects, n_channels + 1) int64

    @property
    def n_points(self) -> int:
        return int(self.coords.shape[0])

    def channel_points(self, c: int) -> np.ndarray:
        """Indices of every point of channel ``c`` (all objects)."""
        parts = [np.arange(self.ranges[o, c], self.ranges[o, c + 1]) for o in range(len(self.centres))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _object_parts(
    sample: Sample, library: dict[str, ParticleModel], in_ice: bool
) -> list[tuple[np.ndarray, list[tuple[Channel, np.ndarray, np.ndarray]]]]:
    """Per object: its centre and its (channel, coords, weights) parts."""
    folded = {name: fold_rare_elements(m) for name, m in library.items() if m.is_atomic}
    objects = []
    for p in sample.particles:
        model = library[p.model]
        placed = (model.coords.astype(np.float64) @ p.rotation.T + p.position_A).astype(np.float32)
        parts = []
        if model.is_atomic:
            elements, target, kind_weight = folded[p.model]
            v_point = model.volume_A3 / model.n_points if in_ice else 0.0
            explicit_h = "H" in model.kinds
            channel_of_point = target[model.kind_index]
            for m, element in enumerate(elements):
                sel = channel_of_point == m
                h = 0.0 if explicit_h else IMPLICIT_HYDROGENS.get(element, 0.0)
                ch = Channel("atom", element, model.b_factor, h, v_point)
                parts.append((ch, placed[sel], kind_weight[model.kind_index[sel]]))
        else:
            parts.append((Channel("map"), placed, model.weights))
        objects.append((p.position_A.astype(np.float32), parts))
    for b in sample.beads:
        ch = Channel("bead", radius_A=b.radius_A, damaged=False)
        objects.append(
            (
                b.position_A.astype(np.float32),
                [(ch, b.position_A[None].astype(np.float32), np.ones(1, np.float32))],
            )
        )
    return objects


def build_scene(sample: Sample, library: dict[str, ParticleModel], *, in_ice: bool) -> Scene:
    """Rotate and translate every model's points into place, grouped by object then channel."""
    objects = _object_parts(sample, library, in_ice)
    channels: list[Channel] = []
    for _, parts in objects:
        for ch, _, _ in parts:
            if ch not in channels:
                channels.append(ch)
    coords, weights = [], []
    ranges = np.zeros((len(objects), len(channels) + 1), np.int64)
    n = 0
    for o, (_, parts) in enumerate(objects):
        by_channel = {ch: (xyz, w) for ch, xyz, w in parts}
        for c, ch in enumerate(channels):
            ranges[o, c] = n
            if ch in by_channel:
                xyz, w = by_channel[ch]
                coords.append(xyz)
                weights.append(np.asarray(w, np.float32))
                n += len(xyz)
        ranges[o, len(channels)] = n
    return Scene(
        channels=tuple(channels),
        coords=np.concatenate(coords) if coords else np.zeros((0, 3), np.float32),
        weights=np.concatenate(weights) if weights else np.zeros(0, np.float32),
        centres=np.asarray([c for c, _ in objects], np.float32).reshape(-1, 3),
        ranges=ranges,
    )
