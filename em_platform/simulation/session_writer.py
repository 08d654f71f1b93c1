"""A single-particle session written as a microscope's software writes one, for the live cryo tests and bench:
each exposure's movie appears in pieces (the camera streaming its frames), then is closed where it lies
(SerialEM) or renamed from a temporary name into place (EPU's transfer), and only then its frame-set mdoc
(``[FrameSet = 0]``: pixel size, dose, target defocus, frame count) is written beside it.

The movies are made once (:func:`make_movie`: real beam-induced motion, a camera's gain and hot pixels, Thon
rings; em_platform.simulation.beam_motion) as 8-bit LZW TIFF, as SerialEM saves counting-mode frames, and
copied for each exposure: a movie takes minutes to make and a Krios lands one every 10 s."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from em_platform.simulation.beam_motion import MovieSpec, movie_frames

CAMERA_SEED = 7  # every movie of a session from the one camera (its gain reference is the session's)
MODES = ("close", "rename")


@dataclass(frozen=True)
class Exposure:
    movie: Path  # the finished movie file to copy
    pixel_A: float
    defocus_A: float  # positive underfocus
    frames: int
    dose_per_frame_e_per_A2: float


def make_movie(
    folder: Path, shape: tuple[int, int], frames: int, seed: int, defocus_A: float, pixel_A: float = 1.0
) -> Exposure:
    """One movie (8-bit LZW TIFF) and the camera's gain reference (:func:`gain_file`) in ``folder``, unless
    there already."""
    import mrcfile
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"movie_{shape[0]}x{shape[1]}x{frames}_df{defocus_A:.0f}_s{seed}.tif"
    e_per_px = 1.2
    if not path.is_file():
        spec = MovieSpec(
            shape=shape,
            n_frames=frames,
            pixel_A=pixel_A,
            e_per_px_frame=e_per_px,
            hot_pixels=200,
            defocus_A=defocus_A,
            seed=seed,
            camera_seed=CAMERA_SEED,
        )
        it, gain, _ = movie_frames(spec)
        stack = np.stack([np.minimum(f, 255).astype(np.uint8) for f in it])
        part = path.with_suffix(".part")
        tifffile.imwrite(part, stack, compression="lzw", photometric="minisblack")
        part.rename(path)
        gain_path = gain_file(folder, shape)
        if not gain_path.is_file():
            part = gain_path.with_suffix(".part")
            with mrcfile.new(part, overwrite=True) as m:
                m.set_data(gain)
                m.voxel_size = pixel_A
            part.rename(gain_path)
    return Exposure(path, pixel_A, defocus_A, frames, e_per_px / pixel_A**2)


def gain_file(folder: Path, shape: tuple[int, int]) -> Path:
    """The gain reference of the camera's movies of ``shape`` (copy it into the session as ``gain_ref.mrc``)."""
    return folder / f"gain_ref_{shape[0]}x{shape[1]}.mrc"


def mdoc_text(movie_name: str, exposure: Exposure, shape: tuple[int, int], voltage_kV: float = 300.0) -> str:
    """SerialEM's frame-set mdoc of one exposure."""
    dose = exposure.dose_per_frame_e_per_A2 * exposure.frames
    return "\n".join(
        [
            f"PixelSpacing = {exposure.pixel_A}",
            f"Voltage = {voltage_kV:g}",
            f"ImageFile = {movie_name}",
            f"ImageSize = {shape[1]} {shape[0]}",
            "DataMode = 0",
            "",
            "[T = SerialEM: a live single-particle session]",
            "",
            "[FrameSet = 0]",
            "TiltAngle = 0.0",
            f"ExposureDose = {dose:.3f}",
            f"PixelSpacing = {exposure.pixel_A}",
            f"Defocus = {-exposure.defocus_A / 1e4:.3f}",
            f"TargetDefocus = {-exposure.defocus_A / 1e4:.3f}",
            f"SubFramePath = X:\\session\\{movie_name}",
            f"NumSubFrames = {exposure.frames}",
            f"FrameDosesAndNumber = {exposure.dose_per_frame_e_per_A2:.4f} {exposure.frames}",
            time.strftime("DateTime = %d-%b-%y  %H:%M:%S"),
            "",
        ]
    )


def write_exposure(
    folder: Path,
    movie_name: str,
    exposure: Exposure,
    shape: tuple[int, int],
    mode: str,
    pieces: int = 8,
    seconds: float = 0.0,
) -> Path:
    """Land one exposure in ``folder``: the movie in ``pieces`` over ``seconds`` (closed in place, or renamed
    from ``.<name>.tmp``: ``mode``), then its mdoc. Returns the movie's path."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    folder.mkdir(parents=True, exist_ok=True)
    data = exposure.movie.read_bytes()
    final = folder / movie_name
    target = final if mode == "close" else folder / f".{movie_name}.tmp"
    step = -(-len(data) // pieces)
    with open(target, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            if seconds:
                time.sleep(seconds / pieces)  # the camera's pace, not a wait for anything
        os.fsync(f.fileno())
    if mode == "rename":
        os.replace(target, final)
    mdoc = folder / f"{movie_name}.mdoc"
    part = folder / f".{movie_name}.mdoc.tmp"
    part.write_text(mdoc_text(movie_name, exposure, shape))
    os.replace(part, mdoc)
    return final
