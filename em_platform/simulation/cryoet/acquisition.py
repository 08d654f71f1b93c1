"""The acquisition plan of one stack: tilt order, geometry errors, defocus, dose, drift; and its RNG streams.

Every random draw comes from ``numpy.random.Generator(PCG64)`` on a ``SeedSequence`` keyed by
(spec seed, stack number, purpose[, tilt]), so a stack is the same whether its tilts run in order, in
parallel, or on another worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from em_platform.simulation.cryoet.detector import drift_trajectory
from em_platform.simulation.cryoet.physics import damage_b_factor
from em_platform.simulation.cryoet.spec import Spec, tilt_angles
from em_platform.simulation.truth import FrameTruth, TiltTruth

ASSEMBLY, GEOMETRY, DETECTOR, TILT = 0, 1, 2, 3


def rng_for(spec: Spec, stack_no: int, purpose: int, tilt: int | None = None) -> np.random.Generator:
    key = (stack_no, purpose) if tilt is None else (stack_no, purpose, tilt)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(spec.seed, spawn_key=key)))


@dataclass(frozen=True)
class PlannedTilt:
    truth: TiltTruth
    rotation_deg: float  # tilt axis + in-plane error
    damage_b_A2: float  # at mid-exposure


def plan_tilts(spec: Spec, stack_no: int, frame_files: list[str] | None = None) -> list[PlannedTilt]:
    """Every tilt of ``stack_no`` in acquisition order with its true geometry, defocus and dose."""
    g, o = spec.geometry, spec.optics
    rng = rng_for(spec, stack_no, GEOMETRY)
    nominal = tilt_angles(g)
    n = len(nominal)
    errors = g.geom_errors == "random"
    d_tilt = rng.normal(0, g.tilt_err, n) if errors else np.zeros(n)
    d_rot = rng.normal(0, g.align_err_rot, n) if errors else np.zeros(n)
    shift_nm = rng.normal(0, g.align_err_tr / math.sqrt(2), (n, 2)) if errors else np.zeros((n, 2))
    syst = rng.normal(0, o.defocus_syst_error)
    nonsyst = rng.normal(0, o.defocus_nonsyst_error, n)
    drifts = [
        drift_trajectory(spec.movies.frames, spec.movies.drift, spec.movies.drift_jitter, rng)
        for _ in range(n)
    ]
    dose = spec.electronbeam.dose_per_tilt
    p = spec.pixel_size_A
    out = []
    for k in range(n):
        df = (spec.defocus_um(stack_no) + syst + nonsyst[k]) * 1e4  # Å
        half_ast = o.astigmatism * 1e4 / 2
        frames = None
        if spec.movies.frames:
            frames = FrameTruth(
                count=spec.movies.frames,
                dose_e_per_A2=dose / spec.movies.frames,
                drift_px=[[float(a), float(b)] for a, b in drifts[k]],
                file=frame_files[k] if frame_files else None,
            )
        shift_px = [float(shift_nm[k, 0] * 10 / p), float(shift_nm[k, 1] * 10 / p)]
        truth = TiltTruth(
            z_index=k,
            nominal_angle_deg=float(nominal[k]),
            true_angle_deg=float(nominal[k] + d_tilt[k]),
            in_plane_rotation_deg=float(d_rot[k]),
            shift_px=shift_px,
            shift_A=[v * p for v in shift_px],
            defocus_u_A=float(df + half_ast),
            defocus_v_A=float(df - half_ast),
            astigmatism_angle_deg=float(o.astigmatism_angle),
            dose_e_per_A2=float(dose),
            accumulated_dose_e_per_A2=float(dose * k),
            frames=frames,
        )
        out.append(
            PlannedTilt(
                truth=truth,
                rotation_deg=g.tilt_axis + float(d_rot[k]),
                damage_b_A2=damage_b_factor(dose * (k + 0.5), spec.simulation.damage_sensitivity),
            )
        )
    return out


def frame_file_name(stack: str, z_index: int, nominal_deg: float, fmt: str) -> str:
    """``frames/<stack>_<ZValue:03d>_<nominal angle:.1f>.<fmt>`` (the contract's movie names)."""
    return f"frames/{stack}_{z_index:03d}_{nominal_deg:.1f}.{fmt}"
