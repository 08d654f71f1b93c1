"""The simulation spec: one YAML (or JSON) file per simulation run, validated on load.

Top-level keys follow ETSimulations' ``configs.yaml`` where they mean the same (``name``,
``num_stacks``, ``apix`` in nm, ``defocus_values`` in µm assigned round-robin, ``bead_occupancy``,
``seed``); the sections follow TEM-Simulator's components (``sample``, ``geometry``, ``electronbeam``,
``optics``, ``detector``) with its key names, except that doses are in e/Å² (TEM-Simulator: e/nm²) and
defocus is positive for underfocus everywhere. Every error names the field (``geometry.tilt_err``)
and the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_MODELS = {"apoferritin_6z6u": "6z6u.pdb.gz"}
MODEL_SUFFIXES = (
    ".pdb",
    ".ent",
    ".cif",
    ".mmcif",
    ".pdb.gz",
    ".ent.gz",
    ".cif.gz",
    ".mmcif.gz",
    ".mrc",
    ".map",
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class SpecError(ValueError):
    """A simulation spec is invalid; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParticleSpec(_Section):
    model: str  # a built-in name (apoferritin_6z6u) or a .pdb/.cif(.gz) or .mrc/.map path
    count: Annotated[int, Field(ge=0)] = 1
    name: str | None = None  # label in the ground truth; default the model's name
    b_factor: NonNegFloat = 0.0  # Å², added to every atom (atomic models)
    map_voxel_size: PositiveFloat | None = None  # Å; maps only, overrides the MRC header
    orientation: Literal["uniform"] = "uniform"

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v in BUILTIN_MODELS:
            return v
        if not v.lower().endswith(MODEL_SUFFIXES):
            raise ValueError(
                f"{v!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a file ending in "
                f"{', '.join(MODEL_SUFFIXES)}"
            )
        return v

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.model in BUILTIN_MODELS:
            return self.model
        return re.sub(r"\.(pdb|ent|cif|mmcif|mrc|map)(\.gz)?$", "", Path(self.model).name, flags=re.I)


class SampleSpec(_Section):
    thickness: PositiveFloat = 60.0  # nm, ice slab (TEM-Simulator thickness_center)
    ice: Literal["water", "mean", "none"] = "water"  # amorphous (Poisson water) | mean potential | vacuum
    margin: NonNegFloat = 2.0  # nm kept free of particles at the slab faces
    inelastic_mean_free_path: PositiveFloat = 315.0  # nm (zero-loss filtered; Parakeet's value at 300 kV)


class GeometrySpec(_Section):
    tilt_scheme: Literal["range", "dose_symmetric"] = "range"
    theta_start: float = -54.0  # deg
    theta_incr: PositiveFloat = 3.0  # deg
    ntilts: Annotated[int, Field(ge=1, le=1000)] = 37
    group_size: Annotated[int, Field(ge=1)] = 2  # dose-symmetric (Hagen) tilts per side
    tilt_axis: float = 0.0  # deg, counter-clockwise from image +y
    geom_errors: Literal["random", "none"] = "random"
    tilt_err: NonNegFloat = 0.5  # deg, σ of the true − nominal tilt angle
    align_err_rot: NonNegFloat = 0.25  # deg, σ of the in-plane rotation
    align_err_tr: NonNegFloat = 0.25  # nm, σ of the translation (each axis gets σ/√2, as TEM-Simulator)


class BeamSpec(_Section):
    acc_voltage: Annotated[float, Field(gt=0, le=3000)] = 300.0  # kV
    energy_spread: NonNegFloat = 1.3  # eV (FWHM)
    dose_per_tilt: NonNegFloat = 3.0  # e/Å² per tilt (TEM-Simulator's dose_per_im is e/nm²)


class OpticsSpec(_Section):
    cs: NonNegFloat = 2.7  # mm
    cc: NonNegFloat = 2.7  # mm
    aperture: NonNegFloat = 50.0  # µm objective aperture diameter (0 = none)
    focal_length: PositiveFloat = 3.0  # mm
    cond_ap_angle: NonNegFloat = 0.05  # mrad, illumination semi-angle
    amplitude_contrast: Annotated[float, Field(ge=0, lt=1)] = 0.07  # via V_im = f_amp·V
    astigmatism: NonNegFloat = 0.0  # µm, defocus_u − defocus_v
    astigmatism_angle: float = 0.0  # deg, defocus_u axis from image +x
    defocus_syst_error: NonNegFloat = 0.0  # µm σ, once per stack
    defocus_nonsyst_error: NonNegFloat = 0.05  # µm σ, per tilt
    slab_thickness: PositiveFloat | None = None  # nm; None = depth of field at Nyquist, (2·apix)²/(2λ)


class DetectorSpec(_Section):
    det_pix_x: Annotated[int, Field(ge=16, le=8192)] = 2000
    det_pix_y: Annotated[int, Field(ge=16, le=8192)] = 2000
    dqe: Annotated[float, Field(gt=0, le=1)] = 0.4
    mtf_a: NonNegFloat = 0.7
    mtf_b: NonNegFloat = 0.2
    mtf_c: NonNegFloat = 0.1
    mtf_alpha: NonNegFloat = 10.0
    mtf_beta: NonNegFloat = 40.0
    gain: PositiveFloat = 1.0  # output units per electron

    @model_validator(mode="after")
    def _mtf_nonzero(self) -> DetectorSpec:
        if self.mtf_a + self.mtf_b + self.mtf_c <= 0:
            raise ValueError("mtf_a + mtf_b + mtf_c must be > 0")
        return self


class MovieSpec(_Section):
    frames: Annotated[int, Field(ge=0, le=200)] = 0  # 0 = no movies
    drift: NonNegFloat = 2.0  # px, total beam-induced drift over a tilt (decaying exponential)
    drift_jitter: NonNegFloat = 0.05  # px, σ of per-frame random motion on top
    gain_variation: Annotated[float, Field(ge=0, lt=0.5)] = 0.05  # σ of per-pixel sensitivity
    format: Literal["tif", "mrc"] = "tif"
    exposure_time: PositiveFloat = 1.0  # s per tilt


class SimulationSpec(_Section):
    phantom_binning: Annotated[int, Field(ge=1, le=16)] = 4  # phantom voxel = binning × apix
    damage_sensitivity: NonNegFloat = 0.022  # Parakeet's S in B = 8π²·S·dose (0 = no damage)
    padding: Annotated[int, Field(ge=0, le=1024)] = 32  # px on each side against wrap-around


class Spec(_Section):
    name: str
    num_stacks: Annotated[int, Field(ge=1, le=10000)] = 1
    seed: Annotated[int, Field(ge=0)] = 0
    apix: PositiveFloat = 0.283  # nm per pixel at the specimen
    defocus_values: list[PositiveFloat] = Field(default_factory=lambda: [3.0], min_length=1)  # µm underfocus
    bead_occupancy: Annotated[float, Field(ge=0, le=0.3)] = 0.0  # volume fraction of gold beads
    bead_radius: PositiveFloat = 5.0  # nm
    particles: list[ParticleSpec] = Field(default_factory=list)
    sample: SampleSpec = SampleSpec()
    geometry: GeometrySpec = GeometrySpec()
    electronbeam: BeamSpec = BeamSpec()
    optics: OpticsSpec = OpticsSpec()
    detector: DetectorSpec = DetectorSpec()
    movies: MovieSpec = MovieSpec()
    simulation: SimulationSpec = SimulationSpec()
    source: str | None = Field(default=None, exclude=True)  # the spec file (set by load_spec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} must be letters, digits, '.', '_' or '-' (it names folders)")
        return v

    @property
    def pixel_size_A(self) -> float:
        return self.apix * 10.0

    def stack_name(self, stack_no: int) -> str:
        return f"{self.name}_{stack_no:03d}"

    def stack_names(self) -> list[str]:
        return [self.stack_name(i) for i in range(self.num_stacks)]

    def defocus_um(self, stack_no: int) -> float:
        """ETSimulations' round-robin: defocus_values[stack_no % len]."""
        return self.defocus_values[stack_no % len(self.defocus_values)]

    def model_path(self, particle: ParticleSpec) -> Path:
        """The file of a particle model: package data for built-ins, else relative to the spec file."""
        if particle.model in BUILTIN_MODELS:
            return Path(__file__).resolve().parent.parent / "data" / BUILTIN_MODELS[particle.model]
        p = Path(particle.model).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).resolve().parent / p
        return p

    def to_doc(self) -> dict[str, Any]:
        """The validated spec with every default filled in (what the ground truth records)."""
        return self.model_dump(mode="json")


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(spec)"


def spec_from_dict(doc: Any, source: str | None = None) -> Spec:
    """Validate a spec document; SpecError lists every bad field by its path."""
    where = source or "simulation spec"
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: expected a mapping of keys, got {type(doc).__name__}")
    try:
        spec = Spec.model_validate({**doc, "source": source})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = "unknown key (not a spec field)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{_field_path(err['loc'])}: {msg}")
        raise SpecError(f"{where}: " + "; ".join(problems)) from None
    _check_models(spec, where)
    _check_geometry(spec, where)
    return spec


def _check_models(spec: Spec, where: str) -> None:
    for i, p in enumerate(spec.particles):
        path = spec.model_path(p)
        if not path.is_file():
            raise SpecError(f"{where}: particles[{i}].model: model file {path} does not exist")
    labels = [p.label for p in spec.particles]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SpecError(f"{where}: particles: two entries share the name {dupes[0]!r}; give one a 'name'")


def _check_geometry(spec: Spec, where: str) -> None:
    g = spec.geometry
    angles = tilt_angles(g)
    if max(abs(a) for a in angles) >= 89.0:
        raise SpecError(f"{where}: geometry: tilts reach {max(angles, key=abs):g}°; |θ| must stay below 89°")
    if spec.sample.thickness <= 2 * spec.sample.margin:
        raise SpecError(
            f"{where}: sample.margin: {spec.sample.margin} nm leaves no room in a "
            f"{spec.sample.thickness} nm slab"
        )


def tilt_angles(g: GeometrySpec) -> list[float]:
    """Nominal tilt angles in acquisition order: a plain range, or Hagen's dose-symmetric scheme."""
    angles = [g.theta_start + i * g.theta_incr for i in range(g.ntilts)]
    if g.tilt_scheme == "range":
        return angles
    start = min(angles, key=abs)  # dose-symmetric: from the tilt nearest 0°, alternating sides in groups
    pos = sorted(a for a in angles if a > start)
    neg = sorted((a for a in angles if a < start), reverse=True)
    order, side = [start], 0
    while pos or neg:
        src = pos if side == 0 else neg
        order.extend(src[: g.group_size])
        del src[: g.group_size]
        side ^= 1
    return order


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file (YAML or JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None
    return spec_from_dict(doc, str(path))


def slab_thickness_A(spec: Spec, wavelength_A: float) -> float:
    """Multislice slab thickness: the spec's, or the depth of field at Nyquist, (2·apix)²/(2λ)."""
    if spec.optics.slab_thickness is not None:
        return spec.optics.slab_thickness * 10.0
    return (2 * spec.pixel_size_A) ** 2 / (2 * wavelength_A)
