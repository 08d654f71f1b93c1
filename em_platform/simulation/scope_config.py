"""Configuration of the simulated microscope (``scope-sim``): montage grid, stage, optics, camera, faults.

The defaults describe the demo scope: 3x3 tiles of 512² px at 4 nm/px, 10 % overlap, ±20 px stage jitter,
an 8-bit camera with a 12-count dark offset and 25 % vignetting at the corners. ``tile_size=5000`` is the
Allen T1 scope's camera.

Faults are injected by raster index (0-based acquisition order) or by grid position, as strings:

=================  ==========================================================================
``blank:5``        tile 5 is taken with the beam blanked (dark offset + read noise only)
``no_section:6``   tile 6 images the support film only (no section): flat but for shot noise
``saturated:7``    tile 7 is over-exposed (``saturation_factor`` x dose): most pixels at full scale
``defocus:10-13``  tiles 10..13 (inclusive) are out of focus (``fault_defocus_um``)
``missing:3``      tile 3 is never acquired: no file, no ``tile.raw``; still counted in ``total_tiles``
``corrupt:8``      tile 8's ``tile.raw`` is sent but its file is truncated (unreadable)
``blank:r1c2``     the tile at row 1, column 2 (also ``defocus:r1c0-r1c3``)
=================  ==========================================================================
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FAULT_KINDS = ("blank", "no_section", "saturated", "defocus", "missing", "corrupt")
_POSITION = re.compile(r"^(?:(\d+)|r(\d+)c(\d+))$")


class ScopeConfig(BaseModel):
    """Everything that determines a simulated montage: the same config gives the same tile bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # montage
    rows: int = Field(3, ge=1, le=1000)
    columns: int = Field(3, ge=1, le=1000)
    tile_size: int = Field(512, ge=64, le=20000, description="camera frame, px (square)")
    overlap: float = Field(
        0.10, gt=0.0, lt=0.5, description="nominal overlap of neighbours, fraction of a tile"
    )
    serpentine: bool = Field(False, description="odd rows acquired right to left")
    origin_px: tuple[float, float] = Field((0.0, 0.0), description="plane position (x, y) of tile r0c0, px")
    pixel_size_nm: float = Field(4.0, gt=0.0)
    # stage
    jitter_px: float = Field(20.0, ge=0.0, description="true position = nominal + uniform(-j, j) per axis")
    stage_rotation_rad: float = Field(
        0.0,
        description="rotation lining the image axes up with the stage's (TEM_comms rotation_angle): a "
        "displacement p px in the image is R(angle)·p·pixel_size nm on the stage",
    )
    stage_readout_error_px: float = Field(
        2.0, ge=0.0, description="std of the error of the reported stage position against the true one"
    )
    # optics
    psf_sigma_px: float = Field(0.7, gt=0.0, description="in-focus blur (Gaussian sigma), px")
    defocus_um: float = Field(0.0, description="base defocus of every tile, µm")
    defocus_sd_um: float = Field(0.3, ge=0.0, description="per-tile random variation of the defocus, µm")
    blur_px_per_um: float = Field(0.8, ge=0.0, description="defocus blur sigma per µm of |defocus|")
    vignetting: float = Field(0.25, ge=0.0, lt=1.0, description="fractional intensity loss at the corners")
    vignetting_center: tuple[float, float] = Field(
        (0.03, -0.02),
        description="offset (x, y) of the beam centre from the frame centre, fraction of a tile",
    )
    # camera
    dtype: Literal["uint8", "uint16"] = "uint8"
    dark_offset: float = Field(12.0, ge=0.0, description="counts with the beam blanked")
    read_noise: float = Field(1.5, ge=0.0, description="std of the read noise, counts")
    dose: float = Field(100.0, gt=0.0, description="electrons per pixel of the open beam at its centre")
    bright_level: float = Field(200.0, gt=0.0, description="counts above dark of the open beam at its centre")
    gain_variation: float = Field(0.01, ge=0.0, lt=0.5, description="std of the per-pixel gain (fraction)")
    # reference frames (acquired before the montage, as pyTEM does)
    brightfield_frames: int = Field(
        8, ge=0, description="frames with the stage moving: specimen averages out"
    )
    darkfield_frames: int = Field(8, ge=0, description="frames with the beam blanked")
    # pacing and randomness
    rate: float = Field(0.0, ge=0.0, description="tiles per second; 0 = as fast as possible")
    seed: int = Field(0, ge=0, description="stage, defocus, noise and (unless specimen_seed) the specimen")
    specimen_seed: int | None = Field(None, ge=0, description="another section of tissue; default: seed")
    # faults
    faults: tuple[str, ...] = Field((), description="fault specs, e.g. 'blank:5', 'defocus:10-13'")
    fault_defocus_um: float = Field(12.0, description="defocus of the tiles of a 'defocus' fault, µm")
    saturation_factor: float = Field(8.0, gt=1.0, description="over-exposure of a 'saturated' tile")

    # -- derived -----------------------------------------------------------------------------------------

    @property
    def total_tiles(self) -> int:
        return self.rows * self.columns

    @property
    def overlap_px(self) -> int:
        """Nominal overlap in whole pixels (what ``tile.raw`` carries)."""
        return round(self.overlap * self.tile_size)

    @property
    def step_px(self) -> int:
        """Nominal distance between neighbouring tiles."""
        return self.tile_size - self.overlap_px

    @property
    def full_scale(self) -> int:
        return 255 if self.dtype == "uint8" else 65535

    @property
    def specimen_seed_value(self) -> int:
        return self.seed if self.specimen_seed is None else self.specimen_seed

    def raster_position(self, index: int) -> tuple[int, int]:
        """(row, column) of the tile acquired ``index``-th (0-based)."""
        row, col = divmod(index, self.columns)
        if self.serpentine and row % 2 == 1:
            col = self.columns - 1 - col
        return row, col

    def raster_index(self, row: int, column: int) -> int:
        col = self.columns - 1 - column if self.serpentine and row % 2 == 1 else column
        return row * self.columns + col

    def nominal_px(self, index: int) -> tuple[float, float]:
        """Nominal plane position (x, y) of the top-left pixel of tile ``index``."""
        row, col = self.raster_position(index)
        return self.origin_px[0] + col * self.step_px, self.origin_px[1] + row * self.step_px

    def fault_plan(self) -> dict[int, frozenset[str]]:
        """Raster index → the fault kinds injected there."""
        plan: dict[int, set[str]] = {}
        for spec in self.faults:
            kind, indices = self.parse_fault(spec)
            for i in indices:
                plan.setdefault(i, set()).add(kind)
        return {i: frozenset(kinds) for i, kinds in sorted(plan.items())}

    def parse_fault(self, spec: str) -> tuple[str, list[int]]:
        """``'kind:where'`` → (kind, raster indices); ``where`` is ``N``, ``N-M``, ``rRcC`` or ``rRcC-rRcC``."""
        usage = (
            f"write KIND:N, KIND:N-M (raster indices, inclusive) or KIND:rRcC, with KIND one of {', '.join(FAULT_KINDS)} "
            f"and indices within the {self.rows}x{self.columns} grid (0..{self.total_tiles - 1})"
        )
        kind, sep, where = str(spec).strip().partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in FAULT_KINDS:
            raise ValueError(f"fault {spec!r}: unknown fault; {usage}")
        parts = where.replace(" ", "").split("-")
        if len(parts) not in (1, 2):
            raise ValueError(f"fault {spec!r}: cannot read the position {where!r}; {usage}")
        indices = []
        for part in parts:
            m = _POSITION.match(part.lower())
            if not m:
                raise ValueError(f"fault {spec!r}: cannot read the position {part!r}; {usage}")
            if m.group(1) is not None:
                index = int(m.group(1))
            else:
                row, col = int(m.group(2)), int(m.group(3))
                if row >= self.rows or col >= self.columns:
                    raise ValueError(f"fault {spec!r}: r{row}c{col} is outside the grid; {usage}")
                index = self.raster_index(row, col)
            if index >= self.total_tiles:
                raise ValueError(f"fault {spec!r}: tile {index} is outside the grid; {usage}")
            indices.append(index)
        # a run in acquisition order between the two tiles (with serpentine rows, r1c0-r1c3 runs backwards)
        first, last = min(indices), max(indices)
        return kind, list(range(first, last + 1))

    @model_validator(mode="after")
    def _check(self) -> ScopeConfig:
        if 2 * self.jitter_px >= self.overlap_px:
            raise ValueError(
                f"stage jitter ±{self.jitter_px:g} px can close the {self.overlap_px} px overlap of neighbouring "
                "tiles; keep the jitter below half the overlap (lower --jitter or raise --overlap)"
            )
        if self.dark_offset + self.bright_level > self.full_scale:
            raise ValueError(
                f"dark_offset + bright_level = {self.dark_offset + self.bright_level:g} counts exceeds the "
                f"{self.dtype} camera's full scale {self.full_scale}; lower bright_level"
            )
        for i, kinds in self.fault_plan().items():
            if "missing" in kinds and len(kinds) > 1:
                raise ValueError(
                    f"tile {i} is both missing and {', '.join(sorted(kinds - {'missing'}))}; a "
                    "missing tile is never acquired, so drop one of the faults"
                )
            if len(kinds & {"blank", "no_section", "saturated"}) > 1:
                raise ValueError(
                    f"tile {i} can be only one of blank (beam blanked), no_section (film only) and saturated"
                )
        return self
