"""MRC/CCP4 volumes, image stacks and micrographs (mrcfile); voxel size from the header, in ångström."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.formats.lazy import check_size, memmap_dask
from em_platform.formats.volume import Volume

MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".st", ".ali")


def read_mrc(path: str | Path) -> Volume:
    """Open an MRC file lazily: header parsed now, voxels read block by block when computed."""
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header
                voxel = mrc.voxel_size
                ext_bytes = int(header.nsymbt)
                nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
                mode = int(header.mode)
                dtype = mrcfile.utils.data_dtype_from_header(header)
                is_image = nz == 1
                exttyp = header.exttyp.tobytes().decode("ascii", "replace").strip("\x00 ")
                labels = [
                    lab.tobytes().decode("ascii", "replace").strip("\x00 ")
                    for lab in header.label[: int(header.nlabl)]
                ]
        problems = [str(w.message) for w in caught if "map ID" in str(w.message) or "mode" in str(w.message)]
        if problems:
            raise ValueError("; ".join(problems))
        dtype = checked_dtype(
            dtype,
            where=str(path),
            field=f"MRC mode {mode} pixel type",
            hint="convert it to a real-valued mode (0, 1, 2, 6 or 12), e.g. with mrcfile or IMOD's newstack",
        )
        if min(nx, ny, nz) < 1:
            raise ValueError(f"header dimensions nx={nx} ny={ny} nz={nz} are not positive")
        offset = 1024 + ext_bytes
        shape = (ny, nx) if is_image else (nz, ny, nx)
        try:
            check_size(path, offset, shape, dtype)
        except ValueError as exc:
            raise ValueError(f"{exc} (nx={nx}, ny={ny}, nz={nz}, mode {mode}, nsymbt={ext_bytes})") from None
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except FormatError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError/struct errors for damaged headers
        raise FormatError(
            f"{path} is not a readable MRC file ({exc}); check the transfer completed or re-export it"
        ) from exc

    axes = ("y", "x") if is_image else ("z", "y", "x")
    sizes = {"x": float(voxel.x), "y": float(voxel.y), "z": float(voxel.z)}
    # mrcfile reports 0 (or 1 with an unset cell) when the header carries no calibration.
    scale = tuple(sizes[a] if sizes[a] > 0 else None for a in axes)
    units = tuple("angstrom" if s is not None else None for s in scale)
    data = memmap_dask(path, offset, shape, dtype)
    if not dtype.isnative:
        data = data.astype(dtype.newbyteorder("="))
    return Volume(
        data=data,
        axes=axes,
        scale=scale,
        units=units,
        format="mrc",
        source_files=(path,),
        source_metadata={
            "mrc_mode": mode,
            "dtype": dtype.name,
            "voxel_size_angstrom": sizes,
            "extended_header_bytes": ext_bytes,
            "extended_header_type": exttyp,
            "labels": labels,
        },
    )
