"""Small, deterministic sample volumes in every supported format, for the demo and the tests.

The texture imitates EM: cell-like compartments bounded by dark membranes, plus shot noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mrcfile
import numpy as np
import tifffile


def em_texture(shape: tuple[int, ...], seed: int, dtype=np.uint8) -> np.ndarray:
    """Deterministic EM-like image or volume: smooth compartments, dark membranes, Poisson noise."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal(shape).astype(np.float32)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij", sparse=True)
    radius2 = sum(f * f for f in freqs)
    smooth = np.fft.ifftn(np.fft.fftn(field) * np.exp(-radius2 / (2 * 0.02**2))).real
    smooth /= smooth.std() + 1e-9
    membranes = np.exp(-(smooth**2) / 0.02)  # thin dark lines where the field crosses zero
    signal = 0.55 + 0.15 * np.tanh(smooth) - 0.35 * membranes
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    top = float(info.max) if info else 1.0
    photons = 200.0
    noisy = rng.poisson(np.clip(signal, 0.02, 1) * photons) / photons
    out = np.clip(noisy, 0, 1) * (0.9 * top)
    return out.astype(dtype) if info else out.astype(dtype)


def write_ome_tiff(path: Path, data: np.ndarray, voxel_nm: dict[str, float]) -> None:
    """An OME-TIFF with axes ZYX (or YX) and physical sizes in nm, as acquisition software writes them."""
    axes = "ZYX"[-data.ndim :]
    meta: dict = {"axes": axes}
    for a in axes:
        meta[f"PhysicalSize{a}"] = float(voxel_nm[a.lower()])
        meta[f"PhysicalSize{a}Unit"] = "nm"
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", metadata=meta)


def _atomic(path: Path, write) -> None:
    """Write through a hidden temporary name, then rename, so a watcher never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_samples(inbox: Path, *, include_dm: bool = True) -> list[Path]:
    """Write the sample set into ``inbox``; existing samples are left untouched (so re-running changes nothing)."""
    inbox.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def want(name: str) -> Path | None:
        p = inbox / name
        if p.exists():
            return None
        written.append(p)
        return p

    if p := want("fibsem_crop.ome.tif"):
        vol = em_texture((24, 192, 192), seed=1)
        _atomic(p, lambda t: write_ome_tiff(t, vol, {"z": 8.0, "y": 5.0, "x": 5.0}))
    if p := want("overview.tif"):
        img = em_texture((384, 512), seed=2)
        _atomic(p, lambda t: tifffile.imwrite(t, img, photometric="minisblack"))
    if p := want("serial_sections"):
        stack = em_texture((12, 160, 200), seed=3, dtype=np.uint16)
        tmp = p.with_name(".serial_sections.tmp")
        tmp.mkdir(exist_ok=True)
        for i, sl in enumerate(stack):
            tifffile.imwrite(
                tmp / f"section_{i:03d}.tif",
                sl,
                imagej=True,
                resolution=(1 / 4.0, 1 / 4.0),
                metadata={"spacing": 40.0, "unit": "nm"},
            )
        os.replace(tmp, p)
    if p := want("tomogram.mrc"):
        tomo = (em_texture((20, 128, 128), seed=4, dtype=np.uint16).astype(np.int32) - 30000).astype(np.int16)

        def _mrc(t: Path) -> None:
            with mrcfile.new(t, overwrite=True) as m:
                m.set_data(tomo)
                m.voxel_size = (13.6, 13.6, 13.6)  # Å

        _atomic(p, _mrc)
    if p := want("block.raw"):
        block = em_texture((16, 96, 128), seed=5, dtype=np.uint16)
        side = inbox / "block.raw.json"
        side.write_text(
            json.dumps(
                {
                    "shape": list(block.shape),
                    "dtype": "uint16",
                    "byte_order": "little",
                    "voxel_size": [30.0, 8.0, 8.0],
                    "unit": "nm",
                }
            )
        )
        _atomic(p, lambda t: block.astype("<u2").tofile(t))
    if include_dm:
        from em_platform.formats.dm_writer import write_dm

        if p := want("micrograph.dm3"):
            img = em_texture((256, 256), seed=6, dtype=np.uint16).astype(np.int16) // 2
            _atomic(p, lambda t: write_dm(t, img, version=3, scale=(0.25, 0.25), units=("nm", "nm")))
        if p := want("tilt_series.dm4"):
            ts = em_texture((8, 128, 128), seed=7, dtype=np.float32)
            _atomic(p, lambda t: write_dm(t, ts, version=4, scale=(2.0, 0.5, 0.5), units=("nm", "nm", "nm")))
    return written
