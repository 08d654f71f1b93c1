"""Writing one simulated tilt series as a microscope session folder, staged and then published whole.

Files (the simulator/processing contract): ``<stack>.mrc`` (noisy) and ``<stack>_noiseless.mrc``
(float32, voxel size in the header, each tilt written at its offset as it finishes: no rewrite pass),
``<stack>.mrc.mdoc`` (SerialEM style), ``<stack>.tlt`` (nominal angles, stack order), ``frames/`` +
``gain_ref.mrc`` for movies, ``phantom.mrc`` and ``ground_truth.json``. Everything goes into a staging
folder; :func:`publish_stack` moves it into place in one rename (local) or uploads it with the mdoc and
the ground truth last (object storage), so a watcher never sees half a stack.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from em_platform.lazy_import import LazyModule
from em_platform.simulation.truth import GroundTruth, write_ground_truth
from em_platform.storage import DataStore

mrcfile = LazyModule("mrcfile")
tifffile = LazyModule("tifffile")

GROUND_TRUTH = "ground_truth.json"
GAIN_REF = "gain_ref.mrc"
PHANTOM = "phantom.mrc"


@dataclass
class _Stats:
    """Running min/max/mean/rms of what went into an MRC, for its header (no second pass)."""

    lo: float = np.inf
    hi: float = -np.inf
    total: float = 0.0
    total_sq: float = 0.0
    n: int = 0

    def add(self, a: np.ndarray) -> None:
        self.lo = min(self.lo, float(a.min()))
        self.hi = max(self.hi, float(a.max()))
        self.total += float(a.sum(dtype=np.float64))
        self.total_sq += float(np.square(a, dtype=np.float64).sum())
        self.n += a.size

    def apply(self, header) -> None:
        """Into an MRC header (mrcfile's record array)."""
        mean = self.total / max(self.n, 1)
        header.dmin, header.dmax, header.dmean = self.lo, self.hi, mean
        header.rms = float(np.sqrt(max(self.total_sq / max(self.n, 1) - mean * mean, 0.0)))


def write_mrc(path: Path, data: np.ndarray, voxel_A: float, *, stack: bool = False) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data))
        if stack:
            mrc.set_image_stack()  # before voxel_size, else the z voxel size comes out wrong
        mrc.voxel_size = voxel_A


@dataclass
class StackFiles:
    """The open outputs of one stack in its staging folder; tilts are written as they finish."""

    folder: Path
    stack: str
    shape: tuple[int, int, int]  # (n_tilts, ny, nx)
    pixel_A: float
    movie_format: str | None = None
    _files: dict = field(default_factory=dict)  # name -> (open fd, byte offset of the data)
    _stats: dict = field(default_factory=dict)

    @property
    def tilt_series(self) -> str:
        return f"{self.stack}.mrc"

    @property
    def noiseless(self) -> str:
        return f"{self.stack}_noiseless.mrc"

    def open(self) -> StackFiles:
        """Create both stacks at full size (header + zero data); tilts are then written in place.

        Tilts go in with ``pwrite`` at their offset, not through a memory map: a map's written pages count
        in the process's RSS until the file is closed (1.2 GB for ETSimulations' 2000² x 37 template).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in (self.tilt_series, self.noiseless):
            path = self.folder / name
            with mrcfile.new_mmap(path, shape=self.shape, mrc_mode=2, overwrite=True) as mrc:
                mrc.set_image_stack()
                mrc.voxel_size = self.pixel_A
                offset = mrc.header.nbytes + mrc.extended_header.nbytes
            self._files[name] = (os.open(path, os.O_WRONLY), offset)
            self._stats[name] = _Stats()
        if self.movie_format:
            (self.folder / "frames").mkdir(exist_ok=True)
        return self

    def write_tilt(self, k: int, noisy: np.ndarray, noiseless: np.ndarray) -> None:
        _, ny, nx = self.shape
        for name, image in ((self.tilt_series, noisy), (self.noiseless, noiseless)):
            fd, offset = self._files[name]
            data = np.ascontiguousarray(image, dtype="<f4")
            if data.shape != (ny, nx):
                raise ValueError(f"{name}: tilt {k} is {data.shape}, the stack holds {(ny, nx)} images")
            os.pwrite(fd, data.data, offset + k * data.nbytes)
            self._stats[name].add(data)

    def write_frames(self, relative: str, frames: np.ndarray) -> None:
        path = self.folder / relative
        if path.suffix == ".tif":
            tifffile.imwrite(path, frames, compression="zlib", photometric="minisblack")
        else:
            write_mrc(path, frames, self.pixel_A, stack=True)

    def close(self) -> None:
        """Close the data and put the running statistics into each header (the header only)."""
        for name, (fd, _) in list(self._files.items()):
            with mrcfile.open(self.folder / name, header_only=True) as mrc:
                header = mrc.header.copy()  # (mrcfile's r+ would rewrite the data block too)
            self._stats[name].apply(header)
            os.pwrite(fd, header.tobytes(), 0)
            os.close(fd)
        self._files.clear()

    def abort(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def tlt_text(nominal_deg: list[float]) -> str:
    """IMOD ``.tlt``/``.rawtlt``: one angle per line, in stack order."""
    return "".join(f"{a:.2f}\n" for a in nominal_deg)


def mdoc_text(truth: GroundTruth, nominal_defocus_um: float, exposure_time_s: float) -> str:
    """A SerialEM-style mdoc: the nominal values a microscope would log (defocus µm, negative = under)."""
    ny, nx = truth.image_shape_yx
    lines = [
        f"PixelSpacing = {truth.pixel_size_A:g}",
        f"Voltage = {truth.voltage_kV:g}",
        f"ImageFile = {truth.files['tilt_series']}",
        f"ImageSize = {nx} {ny}",
        "DataMode = 2",
        "",
        "[T = SerialEM: em_platform cryo-ET simulator (simulated session; truth in ground_truth.json)]",
        "",
        f"[T =     Tilt axis angle = {truth.tilt_axis_angle_deg:g}, binning = 1  spot = 1  camera = 0]",
        "",
    ]
    start = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    for t in truth.tilts:
        when = start + timedelta(seconds=30 * t.z_index)
        lines += [
            f"[ZValue = {t.z_index}]",
            f"TiltAngle = {t.nominal_angle_deg:.2f}",
            f"ExposureDose = {t.dose_e_per_A2:g}",
            f"PixelSpacing = {truth.pixel_size_A:g}",
            f"Defocus = {-nominal_defocus_um:g}",
            f"TargetDefocus = {-nominal_defocus_um:g}",
            f"RotationAngle = {truth.tilt_axis_angle_deg:g}",
            f"ExposureTime = {exposure_time_s:g}",
            f"PriorRecordDose = {t.accumulated_dose_e_per_A2:g}",
            f"DateTime = {when.strftime('%d-%b-%y  %H:%M:%S')}",
        ]
        if t.frames:
            name = posixpath.basename(t.frames.file or "")
            lines += [
                f"SubFramePath = X:\\{truth.spec_name}\\frames\\{name}",
                f"NumSubFrames = {t.frames.count}",
                f"FrameDosesAndNumber = {t.frames.dose_e_per_A2:g} {t.frames.count}",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_metadata(
    folder: Path, truth: GroundTruth, *, nominal_defocus_um: float, exposure_time_s: float
) -> None:
    """The small files: .tlt, .mdoc and ground_truth.json (last)."""
    (folder / truth.files["tlt"]).write_text(tlt_text([t.nominal_angle_deg for t in truth.tilts]))
    (folder / truth.files["mdoc"]).write_text(mdoc_text(truth, nominal_defocus_um, exposure_time_s))
    write_ground_truth(truth, folder / GROUND_TRUTH)


def staging_folder(store: DataStore, final: str) -> Path:
    """Where a stack is assembled: the store's own staging area when local (publish = one rename),
    else a local temporary folder (published by upload)."""
    if store.is_local:
        path = Path(store.staging_path(final))
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="em-sim-"))


def publish_stack(store: DataStore, staging: Path, final: str) -> None:
    """Make the complete stack folder appear at ``final``, replacing an earlier one."""
    if store.is_local:
        store.publish(str(staging), final)
        return
    if store.exists(final):
        for marker in store.fs.glob(posixpath.join(final, "*.mdoc")) + [posixpath.join(final, GROUND_TRUTH)]:
            if store.exists(marker):
                store.fs.rm(marker)  # the old stack stops being a session before its files change
        store.fs.rm(final, recursive=True)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    last = [p for p in files if p.suffix == ".mdoc" or p.name == GROUND_TRUTH]
    for p in [f for f in files if f not in last] + last:
        store.fs.put_file(str(p), posixpath.join(final, p.relative_to(staging).as_posix()))
    shutil.rmtree(staging, ignore_errors=True)


def discard_staging(store: DataStore, staging: Path) -> None:
    if store.is_local:
        store.remove(str(staging))
    else:
        shutil.rmtree(staging, ignore_errors=True)
