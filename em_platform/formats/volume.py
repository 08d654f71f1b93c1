"""The common result of every format reader: a lazy array plus its physical meaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_platform.formats.dtypes import checked_dtype
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
else:
    da = LazyModule("dask.array")


# NGFF (OME-Zarr) space units and their size in nanometres.
UNIT_TO_NM: dict[str, float] = {
    "angstrom": 0.1,
    "nanometer": 1.0,
    "micrometer": 1e3,
    "millimeter": 1e6,
    "meter": 1e9,
}

_UNIT_ALIASES = {
    "a": "angstrom",
    "å": "angstrom",
    "Å".lower(): "angstrom",
    "angstrom": "angstrom",
    "angstroms": "angstrom",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "nanometers": "nanometer",
    "nanometre": "nanometer",
    "um": "micrometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "micrometre": "micrometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "m": "meter",
    "meter": "meter",
}


def normalise_unit(unit: str | None) -> str | None:
    """Map a unit string from a file header ('nm', 'µm', 'Å', ...) to its NGFF name, or None if unknown."""
    if unit is None:
        return None
    return _UNIT_ALIASES.get(unit.strip().lower())


@dataclass(frozen=True)
class Volume:
    """A lazily read EM image or volume.

    ``scale`` and ``units`` are per axis; spatial axes whose size the file does not record carry
    ``None`` in both, so the caller decides (and records) what to assume rather than the reader guessing.
    Its pixel type is one of :data:`~em_platform.formats.dtypes.ALLOWED_DTYPES` (else FormatError).
    """

    data: da.Array
    axes: tuple[str, ...]
    scale: tuple[float | None, ...]
    units: tuple[str | None, ...]
    format: str
    source_files: tuple[Path, ...]
    source_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = str(self.source_files[0]) if self.source_files else f"the {self.format} volume"
        checked_dtype(self.data.dtype, where=where, field="pixel type")  # a reader that forgot its check
        n = self.data.ndim
        if not (len(self.axes) == len(self.scale) == len(self.units) == n):
            raise ValueError(
                f"axes {self.axes}, scale {self.scale} and units {self.units} must each have {n} entries"
            )

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        return tuple(a for a in self.axes if a in ("z", "y", "x"))

    @property
    def calibrated(self) -> bool:
        """True when the file records a physical size for every spatial axis."""
        return all(
            self.scale[i] is not None and self.units[i] is not None
            for i, a in enumerate(self.axes)
            if a in ("z", "y", "x")
        )

    def voxel_size_nm(self) -> dict[str, float | None]:
        """Physical size of one voxel per spatial axis in nanometres (None where the file does not say)."""
        out: dict[str, float | None] = {}
        for a, s, u in zip(self.axes, self.scale, self.units, strict=True):
            if a in ("z", "y", "x"):
                out[a] = None if s is None or u is None else float(s) * UNIT_TO_NM[u]
        return out
