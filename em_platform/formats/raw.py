"""Raw binary volumes: the caller (or a JSON sidecar) states shape, dtype and byte order."""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.formats.lazy import check_size, memmap_dask
from em_platform.formats.volume import FormatError, Volume, normalise_unit

RAW_SUFFIXES = (".raw", ".bin")
SIDECAR_SUFFIX = ".json"


def read_raw(
    path: str | Path,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    axes: tuple[str, ...] | None = None,
    scale: tuple[float | None, ...] | None = None,
    unit: str | None = None,
    byte_order: str = "little",
    offset: int = 0,
    shape_from: str = "shape",
) -> Volume:
    """Open ``path`` as a C-ordered array of ``shape`` and ``dtype`` starting ``offset`` bytes in.

    ``shape`` and ``offset`` must be whole numbers (positive; ≥ 0) that the file holds, else
    :class:`FormatError` naming ``shape_from`` (where they were stated, e.g. the sidecar) and the file's size.
    """
    path = Path(path)
    try:
        shape = tuple(operator.index(s) for s in shape)
        offset = operator.index(offset)
    except TypeError:
        raise FormatError(
            f"{path}: {shape_from} shape {list(shape)} and offset {offset!r} must be whole numbers"
        ) from None
    axes = tuple(axes) if axes else ("z", "y", "x")[-len(shape) :] if len(shape) <= 3 else None
    if axes is None or len(axes) != len(shape):
        raise FormatError(f"{path}: give axes for a raw array of {len(shape)} dimensions (got {axes})")
    try:
        dt = np.dtype(dtype).newbyteorder("<" if byte_order == "little" else ">")
    except TypeError as exc:
        raise FormatError(f"{path}: unknown dtype {dtype!r} for raw data") from exc
    ngff_unit = normalise_unit(unit) if unit else None
    if unit and ngff_unit is None:
        raise FormatError(f"{path}: unknown unit {unit!r}; use nm, µm or Å")
    try:
        check_size(path, offset, shape, dt, shape_from)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except ValueError as exc:
        raise FormatError(
            f"{path}: {exc}; check the transfer completed and the shape/dtype are right"
        ) from exc
    data = memmap_dask(path, offset, shape, dt)
    if not dt.isnative:
        data = data.astype(dt.newbyteorder("="))
    scale = tuple(scale) if scale else (None,) * len(shape)
    units = tuple(
        ngff_unit if s is not None and a in "zyx" else None for a, s in zip(axes, scale, strict=True)
    )
    return Volume(
        data=data,
        axes=axes,
        scale=tuple(s if u is not None else None for s, u in zip(scale, units, strict=True)),
        units=units,
        format="raw",
        source_files=(path,),
        source_metadata={"dtype": dt.name, "byte_order": byte_order, "offset": offset, "shape": list(shape)},
    )


def sidecar_for(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_raw_with_sidecar(path: str | Path) -> Volume:
    """Read a raw file described by ``<name>.json``: {"shape", "dtype", "axes"?, "voxel_size", "unit", ...}."""
    path = Path(path)
    side = sidecar_for(path)
    try:
        spec = json.loads(side.read_text())
        kwargs = dict(
            shape=tuple(spec["shape"]),
            dtype=spec["dtype"],
            axes=tuple(spec["axes"]) if spec.get("axes") else None,
            scale=tuple(spec["voxel_size"]) if spec.get("voxel_size") else None,
            unit=spec.get("unit", "nm") if spec.get("voxel_size") else None,
            byte_order=spec.get("byte_order", "little"),
            offset=spec.get("offset", 0),
            shape_from=f"sidecar {side.name}",
        )
    except FileNotFoundError:
        raise FormatError(
            f"{path}: raw data needs a sidecar {side.name} with shape and dtype, e.g. "
            '{"shape": [64, 512, 512], "dtype": "uint16", "voxel_size": [8, 4, 4], "unit": "nm"}'
        ) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"{side}: invalid raw sidecar ({exc}); it needs 'shape' and 'dtype'") from exc
    return read_raw(path, **kwargs)
