"""RELION STAR files of a tilt series' (or movie set's) motion-corrected micrographs and CTF fits, so a
session continues in RELION 4/5 (or Warp, which imports them) without re-running those steps.

* ``motioncorr/corrected_micrographs.star``: what RELION's MotionCorr job writes: ``data_optics`` (one
  optics group: pixel size, voltage, Cs, amplitude contrast) and ``data_micrographs`` (micrograph, motion
  in Å as ``_rlnAccumMotionTotal/Early/Late``), plus RELION 5's tomography columns for a tilt series
  (``_rlnTomoName``, ``_rlnTomoNominalStageTiltAngle``, ``_rlnTomoNominalTiltAxisAngle``,
  ``_rlnMicrographPreExposure``, ``_rlnTomoNominalDefocus``, ``_rlnMicrographMovieName``).
* ``ctf/micrographs_ctf.star``: what its CtfFind job writes: the same rows with ``_rlnDefocusU/V``,
  ``_rlnDefocusAngle`` (CTFFIND's convention, as here: the angle of the U axis from +x, counter-clockwise),
  ``_rlnCtfAstigmatism``, ``_rlnCtfFigureOfMerit``, ``_rlnCtfMaxResolution`` and, where the pixel reaches
  the ice band, ``_rlnCtfIceRingDensity``.

RELION reads a micrograph per file, so each tilt's micrograph is also written on its own
(``motioncorr/micrographs/<series>_<z>.mrc``). Paths are relative to the series' folder
(``$EM_DATA_ROOT/cryo/<partition key>/``): run RELION from there (its project directory).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from em_platform.cryo.optics import Microscope

OPTICS_GROUP = "opticsGroup1"


MICROGRAPHS = "motioncorr/micrographs"  # relative to the series' folder


def micrograph_file(series: str, z_index: int) -> str:
    return f"{series}_{z_index:03d}.mrc"


def micrograph_name(series: str, z_index: int) -> str:
    """A tilt's micrograph as the STAR files name it: relative to the series' folder."""
    return f"{MICROGRAPHS}/{micrograph_file(series, z_index)}"


def optics_block(pixel_A: float, scope: Microscope) -> dict[str, list]:
    return {
        "rlnOpticsGroupName": [OPTICS_GROUP],
        "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [pixel_A],
        "rlnVoltage": [scope.voltage_kV],
        "rlnSphericalAberration": [scope.cs_mm],
        "rlnAmplitudeContrast": [scope.amplitude_contrast],
        "rlnMicrographPixelSize": [pixel_A],
    }


def _columns(rows: Sequence[Mapping]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}  # every row has the same columns


def micrograph_rows(series: str, tilts: Iterable, tilt_axis_deg: float, tomography: bool) -> list[dict]:
    """The rows every table shares, one per tilt (``tilts``: em_platform.cryo.session.Tilt)."""
    rows = []
    for t in tilts:
        row = {"rlnMicrographName": micrograph_name(series, t.z_index), "rlnOpticsGroup": 1}
        if t.movie_name:
            row["rlnMicrographMovieName"] = str(t.movie) if t.movie else t.movie_name
        if tomography:
            row |= {
                "rlnTomoName": series,
                "rlnTomoNominalStageTiltAngle": t.angle_deg,
                "rlnTomoNominalTiltAxisAngle": tilt_axis_deg,
                "rlnMicrographPreExposure": t.accumulated_dose_e_per_A2,
                "rlnTomoNominalDefocus": -(t.nominal_defocus_A or 0.0) / 1e4,  # µm, SerialEM's sign
            }
        rows.append(row)
    return rows


def corrected_micrographs(base: list[dict], motion: Sequence[Mapping] | None, pixel_A: float) -> list[dict]:
    """``base`` rows with the motion of each (``motion.json``'s tilts, same order), in Å."""
    if not motion:
        return base
    return [
        row
        | {
            "rlnAccumMotionTotal": m["total_motion_px"] * pixel_A,
            "rlnAccumMotionEarly": m["early_motion_px"] * pixel_A,
            "rlnAccumMotionLate": m["late_motion_px"] * pixel_A,
        }
        for row, m in zip(base, motion, strict=True)
    ]


def micrographs_ctf(base: list[dict], ctf: Sequence[Mapping]) -> list[dict]:
    """``base`` rows with each CTF fit (``ctf.json``'s tilts, same order)."""
    out = []
    for row, c in zip(base, ctf, strict=True):
        row = row | {
            "rlnDefocusU": c["defocus_u_A"],
            "rlnDefocusV": c["defocus_v_A"],
            "rlnCtfAstigmatism": c["defocus_u_A"] - c["defocus_v_A"],
            "rlnDefocusAngle": c["astigmatism_angle_deg"],
            "rlnCtfFigureOfMerit": c["cc"],
            "rlnCtfMaxResolution": c["fit_resolution_A"],
        }
        if c.get("ice_ring_density") is not None:
            row["rlnCtfIceRingDensity"] = c["ice_ring_density"]
        out.append(row)
    return out


def exposures_motion(base: Sequence[Mapping], exposures: Sequence[Mapping]) -> list[dict]:
    """``base`` rows with each exposure's motion (Å) as the exposures table holds it: cryo-live's STAR files
    and the RELION project's."""
    return [
        dict(row)
        | {
            "rlnAccumMotionTotal": float(e["total_motion_a"]),
            "rlnAccumMotionEarly": float(e["early_motion_a"]),
            "rlnAccumMotionLate": float(e["late_motion_a"]),
        }
        for row, e in zip(base, exposures, strict=True)
    ]


def exposures_ctf(base: Sequence[Mapping], exposures: Sequence[Mapping]) -> list[dict]:
    """``base`` rows with each exposure's CTF fit as the exposures table holds it: cryo-live's STAR files and
    the RELION project's. The ice ring density only when every exposure has one: a column has every row."""
    every_ice = all(e.get("ice_ring_density") is not None for e in exposures)
    out = []
    for row, e in zip(base, exposures, strict=True):
        row = dict(row) | {
            "rlnDefocusU": float(e["defocus_u_a"]),
            "rlnDefocusV": float(e["defocus_v_a"]),
            "rlnCtfAstigmatism": abs(float(e["astigmatism_a"])),  # RELION's: |U - V|
            "rlnDefocusAngle": float(e["defocus_angle_deg"]),
            "rlnCtfFigureOfMerit": float(e["ctf_figure_of_merit"]),
            "rlnCtfMaxResolution": float(e["ctf_fit_resolution_a"]),
        }
        if every_ice:
            row["rlnCtfIceRingDensity"] = float(e["ice_ring_density"])
        out.append(row)
    return out


def write_star(path: Path, optics: Mapping[str, list], micrographs: Sequence[Mapping]) -> None:
    """``data_optics`` and ``data_micrographs`` as RELION 4/5 writes them (the ``starfile`` package)."""
    import pandas as pd
    import starfile

    blocks = {"optics": pd.DataFrame(optics), "micrographs": pd.DataFrame(_columns(micrographs))}
    starfile.write(blocks, path, overwrite=True)
