"""Raw binary volumes: the caller (or a JSON sidecar) states shape, dtype and byte order.

The dtype is one of :data:`~em_platform.formats.dtypes.ALLOWED_DTYPES`. Its byte order is the one it states
(``">u2"`` is big-endian), else ``byte_order`` (``"little"`` or ``"big"``, little when not given); a dtype and
a ``byte_order`` that disagree are refused rather than one silently winning.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.formats.lazy import check_size, memmap_dask
from em_platform.formats.volume import Volume, normalise_unit

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
    byte_order: str | None = None,
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
    stated = "" if shape_from == "shape" else f" ({shape_from})"
    hint = f'state one of them as the {"sidecar" if stated else "raw"} dtype, e.g. "uint16" or ">u2" (big-endian)'
    dt = checked_dtype(dtype, where=f"{path}{stated}", hint=hint)
    byte_order = _byte_order(dtype, dt, byte_order, f"{path}{stated}")
    dt = dt.newbyteorder("<" if byte_order == "little" else ">")
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


def _byte_order(value: Any, dt: np.dtype, byte_order: str | None, where: str) -> str:
    """The byte order to read, "little" or "big": what the dtype states (a "<"/">" prefix, or a non-native
    numpy dtype), else ``byte_order``, else little. FormatError for another ``byte_order`` or one that
    contradicts the dtype."""
    if byte_order not in (None, "little", "big"):
        raise FormatError(f'{where}: byte_order {byte_order!r} must be "little" or "big"')
    if dt.itemsize == 1:
        return byte_order or "little"  # one byte has no order
    prefix = value[:1] if isinstance(value, str) else ("" if dt.isnative else dt.byteorder)
    states = {"<": "little", ">": "big"}.get(prefix)
    if states and byte_order and states != byte_order:
        raise FormatError(
            f"{where}: dtype {value!r} is {states}-endian but byte_order says {byte_order}; "
            "state the byte order once (in the dtype or as byte_order)"
        )
    return states or byte_order or "little"


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
            byte_order=spec.get("byte_order"),
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
