"""Sample assembly: particles and gold beads at random, non-overlapping positions in an ice slab.

Positions are uniform in the slab (bounding spheres never overlap, none pokes out of the ice or out of
the field of view at 0°), orientations uniform on SO(3) (``scipy.spatial.transform.Rotation.random``).
This replaces ETSimulations' Chimera session: a particle is placed by rotating and translating its
points, r = R·r_model + t, so the truth (R, t) is exactly what was imaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from em_platform.simulation.cryoet.models import ParticleModel, sphere_volume
from em_platform.simulation.cryoet.spec import Spec

MAX_TRIES = 2000


class AssemblyError(ValueError):
    """The sample cannot be assembled as specified (the message names the spec field)."""


@dataclass(frozen=True)
class PlacedParticle:
    id: int
    model: str
    position_A: np.ndarray  # (x, y, z) specimen frame
    rotation: np.ndarray  # 3×3 active, model → specimen


@dataclass(frozen=True)
class Bead:
    id: int
    position_A: np.ndarray
    radius_A: float


@dataclass(frozen=True)
class Sample:
    size_A: tuple[float, float, float]  # (x, y, z) extent of the slab region placed into
    particles: list[PlacedParticle]
    beads: list[Bead]


def bead_count(spec: Spec) -> int:
    """Gold beads for ``bead_occupancy`` (the volume fraction of the slab they fill), as TEM-Simulator."""
    if spec.bead_occupancy <= 0:
        return 0
    fov = (spec.detector.det_pix_x * spec.apix, spec.detector.det_pix_y * spec.apix)
    volume = fov[0] * fov[1] * spec.sample.thickness
    return int(round(spec.bead_occupancy * volume / sphere_volume(spec.bead_radius)))


def assemble(spec: Spec, library: dict[str, ParticleModel], rng: np.random.Generator) -> Sample:
    """Place every particle and bead of ``spec``; raises AssemblyError when they do not fit."""
    p = spec.pixel_size_A
    size = (spec.detector.det_pix_x * p, spec.detector.det_pix_y * p, spec.sample.thickness * 10.0)
    margin = spec.sample.margin * 10.0
    todo: list[tuple[str, float, str]] = []  # (name, radius, field)
    for i, ps in enumerate(spec.particles):
        todo += [(ps.label, library[ps.label].radius_A, f"particles[{i}]")] * ps.count
    todo += [("bead", spec.bead_radius * 10.0, "bead_occupancy")] * bead_count(spec)
    order = sorted(range(len(todo)), key=lambda k: -todo[k][1])  # big ones first pack best
    centres = np.zeros((len(todo), 3))
    radii = np.zeros(len(todo))
    for n, k in enumerate(order):
        name, r, field = todo[k]
        half = np.array([size[0] / 2 - r, size[1] / 2 - r, size[2] / 2 - margin - r])
        if (half < 0).any():
            raise AssemblyError(
                f"{field}: {name} (radius {r / 10:.1f} nm) does not fit in the {size[2] / 10:g} nm slab "
                f"of {size[0] / 10:g} × {size[1] / 10:g} nm (sample.thickness, sample.margin, detector size)"
            )
        for _ in range(MAX_TRIES):
            c = rng.uniform(-half, half)
            if n == 0 or (np.linalg.norm(centres[:n] - c, axis=1) >= radii[:n] + r).all():
                break
        else:
            raise AssemblyError(
                f"{field}: no free place for {name} after {MAX_TRIES} tries ({n} of {len(todo)} objects "
                f"placed); fewer particles, a thicker sample or a larger detector"
            )
        centres[n], radii[n] = c, r
    placed = {k: centres[n] for n, k in enumerate(order)}
    from scipy.spatial.transform import Rotation  # here: scipy.spatial costs every code-location import 0.2 s

    particles: list[PlacedParticle] = []
    beads: list[Bead] = []
    for k, (name, r, _) in enumerate(todo):
        if name == "bead":
            beads.append(Bead(len(beads), placed[k], r))
        else:
            rot = Rotation.random(random_state=rng).as_matrix()
            particles.append(PlacedParticle(len(particles), name, placed[k], rot))
    return Sample(size_A=size, particles=particles, beads=beads)


def rotation_record(matrix: np.ndarray) -> dict[str, list]:
    """The ground truth's three spellings of one rotation (matrix, RELION ZYZ Euler, quaternion)."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_matrix(matrix)
    # RELION's Euler_angles2matrix(rot, tilt, psi) = Rz(−psi)·Ry(−tilt)·Rz(−rot) (active factors) is the
    # matrix that carries the reference into the particle's pose: its transpose is intrinsic Z-Y-Z.
    euler = Rotation.from_matrix(np.asarray(matrix).T).as_euler("ZYZ", degrees=True)
    x, y, z, w = rot.as_quat()
    return {
        "rotation_matrix": np.asarray(matrix).round(12).tolist(),
        "euler_zyz_deg": [float(v) for v in euler],
        "quaternion_wxyz": [float(w), float(x), float(y), float(z)],
    }
