"""Ground truth of one simulated tilt series (``ground_truth.json``): what was put in front of the beam.

Dagster-free and numpy-free on purpose: cryo processing imports it to score its estimates against the
truth, and the simulator writes it. The conventions (stated once, in ``CONVENTIONS``) are those of the
simulator/processing contract: arrays are (n_tilts, ny, nx), positions are listed (x, y, z), defocus is
positive for underfocus, rotations are active matrices on (x, y, z) column vectors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "em_platform.simulation.ground_truth/1"

CONVENTIONS: dict[str, str] = {
    "arrays": "numpy order: tilt series (n_tilts, ny, nx), volumes (nz, ny, nx); x = columns (fast axis)",
    "positions": "(x, y, z) nm, origin at the volume centre, z along the beam",
    "image_origin": "tilt images have their origin at pixel (nx//2, ny//2), 0-based",
    "tilt": "a point (x, y, z) at tilt θ appears at x' = x·cosθ + z·sinθ, y' = y (R_y(θ) on (x, y, z)), "
    "then the image is rotated by tilt_axis_angle_deg + in_plane_rotation_deg (counter-clockwise in the "
    "(x, y) plane) about the image centre, then shifted by shift_px",
    "tilt_axis_angle": "counter-clockwise from the image +y axis (SerialEM/IMOD); 0 = axis along y",
    "shift": "content that would be at (x, y) px appears at (x + dx, y + dy)",
    "defocus": "positive = underfocus, Å, at the tilt axis (image centre); defocus_u_A >= defocus_v_A; "
    "astigmatism_angle_deg = angle of the defocus_u axis counter-clockwise from image +x (CTFFIND)",
    "defocus_gradient": "a point at height z' (along the beam, after tilting) has defocus Δf + z'; on the "
    "specimen mid-plane that is Δf(x') = Δf − x'·tanθ (x' in Å from the tilt axis)",
    "rotation": "active matrix on (x, y, z) column vectors, model frame → specimen frame (a model point r "
    "sits at position + R·r); euler_zyz_deg = RELION (rot, tilt, psi) with R = RELION's "
    "Euler_angles2matrix(rot, tilt, psi) = Rz(−psi)·Ry(−tilt)·Rz(−rot), i.e. Rᵀ = Rz(rot)·Ry(tilt)·Rz(psi) "
    "(active factors); quaternion_wxyz of R (scalar first)",
    "dose": "e/Å²; accumulated_dose_e_per_A2 = dose received before this tilt, in acquisition order",
    "stack_order": "acquisition order (not sorted by angle); section k of the MRC = ZValue k of the mdoc",
    "frame_drift": "frames.drift_px[i] = where frame i's content sits relative to the undrifted image",
    "mdoc_defocus": "the mdoc carries the nominal defocus in µm in SerialEM's sign (negative = underfocus)",
}


class GroundTruthError(ValueError):
    """A ground-truth file is missing, of another schema, or lacks a required key (the message says which)."""


@dataclass(frozen=True)
class FrameTruth:
    """A tilt recorded as a dose-fractionated movie."""

    count: int
    dose_e_per_A2: float  # per frame
    drift_px: list[list[float]]  # [[dx, dy], ...] per frame
    file: str | None = None  # the movie, relative to the stack folder


@dataclass(frozen=True)
class TiltTruth:
    z_index: int
    nominal_angle_deg: float
    true_angle_deg: float
    in_plane_rotation_deg: float
    shift_px: list[float]
    shift_A: list[float]
    defocus_u_A: float
    defocus_v_A: float
    astigmatism_angle_deg: float
    dose_e_per_A2: float
    accumulated_dose_e_per_A2: float
    frames: FrameTruth | None = None

    @property
    def defocus_A(self) -> float:
        """Mean defocus (Å, positive = underfocus)."""
        return 0.5 * (self.defocus_u_A + self.defocus_v_A)


@dataclass(frozen=True)
class ParticleTruth:
    id: int
    model: str
    position_nm: list[float]
    rotation_matrix: list[list[float]]
    euler_zyz_deg: list[float]
    quaternion_wxyz: list[float]


@dataclass(frozen=True)
class FiducialTruth:
    id: int
    position_nm: list[float]
    radius_nm: float


@dataclass(frozen=True)
class PhantomTruth:
    file: str
    voxel_size_A: float
    shape_zyx: list[int]


@dataclass(frozen=True)
class GroundTruth:
    stack: str
    spec_name: str
    seed: int
    spec: dict[str, Any]
    pixel_size_A: float
    image_shape_yx: list[int]
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    tilt_axis_angle_deg: float
    tilts: list[TiltTruth]
    particles: list[ParticleTruth]
    fiducials: list[FiducialTruth]
    phantom: PhantomTruth | None
    files: dict[str, Any]
    conventions: dict[str, str] = field(default_factory=lambda: dict(CONVENTIONS))
    extra: dict[str, Any] = field(default_factory=dict)  # added keys (microscope, detector, ice, ...)
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        extra = doc.pop("extra")
        return {"schema": doc.pop("schema"), **doc, **extra}

    def tilt_by_angle(self) -> list[TiltTruth]:
        """The tilts sorted by nominal angle (the stack is in acquisition order)."""
        return sorted(self.tilts, key=lambda t: t.nominal_angle_deg)

    def project(self, position_nm: Sequence[float], tilt: TiltTruth) -> tuple[float, float]:
        """Pixel (column x, row y), 0-based, where a specimen point (x, y, z) nm appears in ``tilt``."""
        return project_point(
            position_nm,
            true_angle_deg=tilt.true_angle_deg,
            rotation_deg=self.tilt_axis_angle_deg + tilt.in_plane_rotation_deg,
            shift_px=tilt.shift_px,
            pixel_size_A=self.pixel_size_A,
            image_shape_yx=self.image_shape_yx,
        )


def project_point(
    position_nm: Sequence[float],
    *,
    true_angle_deg: float,
    rotation_deg: float,
    shift_px: Sequence[float],
    pixel_size_A: float,
    image_shape_yx: Sequence[int],
) -> tuple[float, float]:
    """The contract's tilt geometry for one point: R_y(θ), projection along z, in-plane rotation, shift."""
    x, y, z = (10.0 * float(v) / pixel_size_A for v in position_nm)  # nm → px
    t = math.radians(true_angle_deg)
    xt = x * math.cos(t) + z * math.sin(t)
    r = math.radians(rotation_deg)
    xr = xt * math.cos(r) - y * math.sin(r)
    yr = xt * math.sin(r) + y * math.cos(r)
    ny, nx = image_shape_yx
    return xr + shift_px[0] + nx // 2, yr + shift_px[1] + ny // 2


def _need(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise GroundTruthError(f"{where}: missing key {key!r}")
    return doc[key]


def _tilt(doc: Mapping[str, Any], i: int) -> TiltTruth:
    where = f"tilts[{i}]"
    frames = doc.get("frames")
    return TiltTruth(
        z_index=int(_need(doc, "z_index", where)),
        nominal_angle_deg=float(_need(doc, "nominal_angle_deg", where)),
        true_angle_deg=float(_need(doc, "true_angle_deg", where)),
        in_plane_rotation_deg=float(_need(doc, "in_plane_rotation_deg", where)),
        shift_px=[float(v) for v in _need(doc, "shift_px", where)],
        shift_A=[float(v) for v in _need(doc, "shift_A", where)],
        defocus_u_A=float(_need(doc, "defocus_u_A", where)),
        defocus_v_A=float(_need(doc, "defocus_v_A", where)),
        astigmatism_angle_deg=float(_need(doc, "astigmatism_angle_deg", where)),
        dose_e_per_A2=float(_need(doc, "dose_e_per_A2", where)),
        accumulated_dose_e_per_A2=float(_need(doc, "accumulated_dose_e_per_A2", where)),
        frames=None
        if not frames
        else FrameTruth(
            count=int(_need(frames, "count", f"{where}.frames")),
            dose_e_per_A2=float(_need(frames, "dose_e_per_A2", f"{where}.frames")),
            drift_px=[[float(a), float(b)] for a, b in _need(frames, "drift_px", f"{where}.frames")],
            file=frames.get("file"),
        ),
    )


_TOP = {f.name for f in GroundTruth.__dataclass_fields__.values()} - {"extra"}


def ground_truth_from_dict(doc: Mapping[str, Any]) -> GroundTruth:
    """Parse a ground-truth document; unknown keys are kept in ``extra``."""
    schema = doc.get("schema")
    if schema != SCHEMA:
        raise GroundTruthError(f"schema is {schema!r}, expected {SCHEMA!r}")
    phantom = doc.get("phantom")
    return GroundTruth(
        stack=str(_need(doc, "stack", "ground truth")),
        spec_name=str(_need(doc, "spec_name", "ground truth")),
        seed=int(_need(doc, "seed", "ground truth")),
        spec=dict(doc.get("spec", {})),
        pixel_size_A=float(_need(doc, "pixel_size_A", "ground truth")),
        image_shape_yx=[int(v) for v in _need(doc, "image_shape_yx", "ground truth")],
        voltage_kV=float(_need(doc, "voltage_kV", "ground truth")),
        cs_mm=float(_need(doc, "cs_mm", "ground truth")),
        amplitude_contrast=float(_need(doc, "amplitude_contrast", "ground truth")),
        tilt_axis_angle_deg=float(_need(doc, "tilt_axis_angle_deg", "ground truth")),
        tilts=[_tilt(t, i) for i, t in enumerate(_need(doc, "tilts", "ground truth"))],
        particles=[
            ParticleTruth(
                id=int(p["id"]),
                model=str(p["model"]),
                position_nm=[float(v) for v in p["position_nm"]],
                rotation_matrix=[[float(v) for v in row] for row in p["rotation_matrix"]],
                euler_zyz_deg=[float(v) for v in p["euler_zyz_deg"]],
                quaternion_wxyz=[float(v) for v in p["quaternion_wxyz"]],
            )
            for p in doc.get("particles", [])
        ],
        fiducials=[
            FiducialTruth(int(f["id"]), [float(v) for v in f["position_nm"]], float(f["radius_nm"]))
            for f in doc.get("fiducials", [])
        ],
        phantom=None
        if not phantom
        else PhantomTruth(str(phantom["file"]), float(phantom["voxel_size_A"]), list(phantom["shape_zyx"])),
        files=dict(doc.get("files", {})),
        conventions=dict(doc.get("conventions", CONVENTIONS)),
        extra={k: v for k, v in doc.items() if k not in _TOP},
    )


def read_ground_truth(path: str | Path) -> GroundTruth:
    """Read ``ground_truth.json`` (or ``<name>.ground_truth.json``); errors name the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: no such ground-truth file") from None
    except json.JSONDecodeError as exc:
        raise GroundTruthError(f"{path}: not valid JSON ({exc})") from None
    try:
        return ground_truth_from_dict(doc)
    except GroundTruthError as exc:
        raise GroundTruthError(f"{path}: {exc}") from None


def write_ground_truth(truth: GroundTruth, path: str | Path) -> None:
    """Write the document (plain JSON, 2-space indent); callers write it into a staging folder."""
    Path(path).write_text(json.dumps(truth.to_dict(), indent=2, allow_nan=False) + "\n")
