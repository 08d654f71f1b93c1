"""Every processing step scored against the simulator's ground truth (``ground_truth.json`` + phantom).

Figures (and the gauge each one removes, because the truth and the estimate may differ by it legitimately):
- CTF: defocus error in % of the true mean defocus per tilt (median and max over tilts); astigmatism-angle
  error (mod 180°) on the tilts whose true astigmatism exceeds 500 Å.
- Motion: per tilt, RMS over frames of estimated − true drift after removing each one's mean (the corrected
  micrograph may sit anywhere by a constant); RMS over all frames of all tilts.
- Alignment: RMS of estimated − true shifts after removing the alignment's gauge, a translation of the
  specimen: a common translation, a height term z₀·sin θ and a lateral term x₀·(cos θ − 1), both perpendicular
  to the axis (moving the specimen along z or across the axis shifts the views that way and only moves the
  tomogram); each view's in-plane rotation error (about the mean); tilt-axis angle error.
- Tomogram: FSC against the phantom (after an integer-voxel registration and the contrast sign that
  correlates positively), resolution at 0.5 and 0.143, for the aligned reconstruction and for one with the
  nominal geometry (no shifts, nominal axis) — alignment must make it better.
- Denoising: PSNR gain of the denoised tomogram over the plain one, both against the reconstruction of the
  noiseless stack through the same geometry (an affine intensity match first; see ``matched_psnr``).

The figures are judged by one blocking check each (:func:`check_verdicts`): a check that cannot tell (no
tilt astigmatic enough, two tomograms at the grid's limit) says so instead of passing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.cryo import processing as proc
from em_platform.cryo import session as sess
from em_platform.cryo.denoise import matched_psnr
from em_platform.cryo.fsc import fsc_curve, register_translation, resolution_at, shift_integer
from em_platform.cryo.optics import Microscope
from em_platform.simulation.truth import GroundTruth

ASTIGMATISM_MIN_A = 500.0

# The "Done when" limits, one blocking check each.
THRESHOLDS = {
    "defocus_error_pct_median": 1.0,
    "astigmatism_angle_error_deg_max": 5.0,
    "drift_rms_error_px": 0.5,
    "shift_rms_error_px": 1.0,
    "tilt_axis_error_deg": 0.5,
}


def ctf_figures(ctf_rows: list[dict], truth: GroundTruth) -> dict:
    by_z = {t.z_index: t for t in truth.tilts}
    errors, angle_errors = [], []
    for r in ctf_rows:
        t = by_z[r["z_index"]]
        est = 0.5 * (r["defocus_u_A"] + r["defocus_v_A"])
        errors.append(100.0 * abs(est - t.defocus_A) / t.defocus_A)
        if t.defocus_u_A - t.defocus_v_A > ASTIGMATISM_MIN_A:
            d = (r["astigmatism_angle_deg"] - t.astigmatism_angle_deg) % 180.0
            angle_errors.append(min(d, 180.0 - d))
    return {
        "defocus_error_pct_median": float(np.median(errors)),
        "defocus_error_pct_mean": float(np.mean(errors)),
        "defocus_error_pct_max": float(np.max(errors)),
        "defocus_error_pct_per_tilt": [round(e, 3) for e in errors],
        "astigmatism_angle_error_deg_max": float(max(angle_errors)) if angle_errors else None,
        "astigmatism_angle_error_deg_median": float(np.median(angle_errors)) if angle_errors else None,
        "astigmatic_tilts": len(angle_errors),
    }


def drift_figures(motion: dict, truth: GroundTruth) -> dict:
    by_z = {t.z_index: t for t in truth.tilts}
    sq, per_tilt = [], []
    for row in motion.get("tilts", []):
        t = by_z[row["z_index"]]
        if t.frames is None:
            continue
        est = np.array(row["shifts_px"], float)
        true = np.array(t.frames.drift_px, float)
        err = (est - est.mean(0)) - (true - true.mean(0))
        e2 = (err**2).sum(axis=1)
        sq.extend(e2.tolist())
        per_tilt.append(float(math.sqrt(e2.mean())))
    if not sq:
        return {"drift_rms_error_px": None}
    return {
        "drift_rms_error_px": float(math.sqrt(np.mean(sq))),
        "drift_rms_error_px_max_tilt": float(max(per_tilt)),
        "drift_true_rms_px": float(
            math.sqrt(
                np.mean(
                    [
                        ((np.array(t.frames.drift_px) - np.mean(t.frames.drift_px, 0)) ** 2).sum(1).mean()
                        for t in truth.tilts
                        if t.frames
                    ]
                )
            )
        ),
    }


def content_shift_px(tilt, motion_corrected: bool) -> np.ndarray:
    """Where a tilt's content sits in the image the alignment saw: the truth's shift, plus, in a micrograph
    summed from its movie, the frames' mean drift (motion correction registers the frames to their mean
    position, so the sum's content sits where the drift averages to, not where the undrifted image has it)."""
    shift = np.asarray(tilt.shift_px, float)
    if motion_corrected and tilt.frames is not None:
        shift = shift + np.mean(np.asarray(tilt.frames.drift_px, float), axis=0)
    return shift


def alignment_figures(alignment: dict, truth: GroundTruth, motion_corrected: bool = False) -> dict:
    by_z = {t.z_index: t for t in truth.tilts}
    rows = alignment["tilts"]
    est = np.array([r["shift_px"] for r in rows], float)
    true = np.array([content_shift_px(by_z[r["z_index"]], motion_corrected) for r in rows], float)
    angles = np.radians([by_z[r["z_index"]].true_angle_deg for r in rows])
    phi = math.radians(truth.tilt_axis_angle_deg)
    perp = np.array([math.cos(phi), math.sin(phi)])  # image direction perpendicular to the tilt axis
    diff = est - true
    # least squares for the gauge of any tilt-series alignment, a translation of the specimen: a common
    # translation (2), a height z0 (diff ≈ z0·sinθ·perp) and a lateral offset x0 across the axis
    # (diff ≈ x0·(cosθ − 1)·perp): each only moves the tomogram
    design = np.zeros((2 * len(rows), 4))
    design[0::2, 0] = 1
    design[1::2, 1] = 1
    design[0::2, 2] = np.sin(angles) * perp[0]
    design[1::2, 2] = np.sin(angles) * perp[1]
    design[0::2, 3] = (np.cos(angles) - 1) * perp[0]
    design[1::2, 3] = (np.cos(angles) - 1) * perp[1]
    coef, *_ = np.linalg.lstsq(design, diff.ravel(), rcond=None)
    resid = diff.ravel() - design @ coef
    centred = diff - diff.mean(0)
    axis_err = abs(alignment["tilt_axis_angle_deg"] - truth.tilt_axis_angle_deg)
    # each view's own rotation against the truth's in-plane error, both about their mean (a common turn is
    # the tilt axis's angle, scored above)
    est_rot = np.array([r.get("rotation_deg", 0.0) for r in rows], float)
    true_rot = np.array([by_z[r["z_index"]].in_plane_rotation_deg for r in rows], float)
    rot_err = (est_rot - est_rot.mean()) - (true_rot - true_rot.mean())
    return {
        "rotation_rms_error_deg": float(math.sqrt(np.mean(rot_err**2))),
        "true_rotation_rms_deg": float(math.sqrt(np.mean((true_rot - true_rot.mean()) ** 2))),
        "shift_rms_error_px": float(math.sqrt((resid**2).sum() / len(rows))),
        "shift_rms_error_px_translation_only": float(math.sqrt((centred**2).sum(1).mean())),
        "z_offset_px": float(coef[2]),
        "x_offset_px": float(coef[3]),
        "true_shift_rms_px": float(math.sqrt(((true - true.mean(0)) ** 2).sum(1).mean())),
        "tilt_axis_error_deg": float(min(axis_err, 180 - axis_err)),
        "tilt_axis_estimated_deg": float(alignment["tilt_axis_angle_deg"]),
        "tilt_axis_true_deg": truth.tilt_axis_angle_deg,
    }


def _fit_to(volume: np.ndarray, shape) -> np.ndarray:
    """Centre-crop or zero-pad ``volume`` to ``shape``."""
    out = np.zeros(shape, np.float32)
    src, dst = [], []
    for n_in, n_out in zip(volume.shape, shape, strict=True):
        if n_in >= n_out:
            a = (n_in - n_out) // 2
            src.append(slice(a, a + n_out))
            dst.append(slice(0, n_out))
        else:
            a = (n_out - n_in) // 2
            src.append(slice(0, n_in))
            dst.append(slice(a, a + n_in))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def fsc_against(volume: np.ndarray, phantom: np.ndarray, voxel_A: float) -> dict:
    vol = _fit_to(np.asarray(volume, np.float32), phantom.shape)
    max_shift = max(4, min(phantom.shape) // 4)
    shift = register_translation(vol, phantom, max_shift=max_shift)
    vol = shift_integer(vol, shift)
    sign = 1.0 if np.sum((vol - vol.mean()) * (phantom - phantom.mean())) >= 0 else -1.0
    if sign < 0:  # a negative-contrast tomogram: register its negative
        shift2 = register_translation(-vol, phantom, max_shift=max_shift)
        vol = -shift_integer(vol, shift2)
        shift = shift + shift2
    freqs, curve = fsc_curve(vol, phantom, voxel_A)
    return {
        "fsc_0.5_A": resolution_at(freqs, curve, 0.5),
        "fsc_0.143_A": resolution_at(freqs, curve, 0.143),
        "registration_shift_zyx": [int(s) for s in shift],
        "contrast_inverted": sign < 0,
        "curve": {
            "freq_per_A": [round(float(f), 5) for f in freqs],
            "fsc": [round(float(c), 4) for c in curve],
        },
    }


def _read(path: Path) -> np.ndarray:
    with proc.open_mrc(path) as m:
        return np.asarray(m.data, np.float32)


def clean_reference(ts, ws, truth: GroundTruth, scope: Microscope, tomo: dict, settings, out: Path) -> Path:
    """The noiseless stack reconstructed as the tomogram was (its alignment, angles, CTF and binning): the
    reference a denoiser is scored against. The noiseless twin has no frame drift, so the content shift the
    alignment found in the movie sums is taken back off (see :func:`content_shift_px`)."""
    ali = ws.json("alignment", "alignment.json")
    by_z = {t.z_index: t for t in truth.tilts}
    shifts = np.array([t["shift_px"] for t in ali["tilts"]], float)
    if (ws.step("motioncorr") / "corrected.mrc").is_file():
        shifts -= np.array(
            [content_shift_px(by_z[t["z_index"]], True) - by_z[t["z_index"]].shift_px for t in ali["tilts"]]
        )
    ctf_rows = ws.json("ctf", "ctf.json")["tilts"] if tomo["phase_flipped"] else None
    clean = sess.load_stack(dataclasses.replace(ts, stack=ts.truth.parent / truth.files["noiseless"]))
    stack = proc.prepared_stack(
        clean,
        out.with_name(out.stem + "_stack.mrc"),
        ts,
        shifts,
        proc.view_angles(ali),
        ctf_rows,
        tomo["binning"],
        scope,
        tomo["phase_flipped"],
    )
    angles = np.array([t["angle_deg"] for t in ali["tilts"]])
    proc.reconstruct_to(out, stack, angles, tomo["shape_zyx"][0], "wbp", tomo["voxel_size_A"], settings)
    return out


def tomogram_figures(ts, ws, truth: GroundTruth, scope: Microscope, tomo: dict, settings) -> dict:
    """FSC of the aligned tomograms, of a nominal-geometry one, and the denoising PSNR gain."""
    if truth.phantom is None:
        return {}
    base = ts.truth.parent
    phantom = _read(base / truth.phantom.file)
    voxel = truth.phantom.voxel_size_A
    out: dict = {}
    for method, path in tomo["files"].items():
        out[f"fsc_{method}"] = fsc_against(_read(Path(path)), phantom, voxel)
    # nominal geometry: no shifts, the mdoc's axis
    ctf_rows = ws.json("ctf", "ctf.json")["tilts"] if tomo["phase_flipped"] else None
    data = proc.micrographs(ts, ws)
    binning, nz = tomo["binning"], tomo["shape_zyx"][0]
    work = ws.dir / ".evaluation-scratch"
    work.mkdir(parents=True, exist_ok=True)
    try:
        zero = np.zeros((len(ts.tilts), 2))
        stack = proc.prepared_stack(
            data,
            work / "nominal.mrc",
            ts,
            zero,
            ts.tilt_axis_deg,
            ctf_rows,
            binning,
            scope,
            tomo["phase_flipped"],
        )
        proc.reconstruct_to(
            work / "nominal_wbp.mrc", stack, ts.angles_deg, nz, "wbp", tomo["voxel_size_A"], settings
        )
        out["fsc_unaligned"] = fsc_against(_read(work / "nominal_wbp.mrc"), phantom, voxel)
        noiseless = truth.files.get("noiseless")
        if noiseless and (base / noiseless).is_file():
            clean_reference(ts, ws, truth, scope, tomo, settings, work / "clean_wbp.mrc")
            clean_vol = _read(work / "clean_wbp.mrc")
            noisy = _read(Path(tomo["files"]["wbp"])) if "wbp" in tomo["files"] else None
            den = ws.step("denoised") / "denoise.json"
            if noisy is not None and den.is_file():
                d = json.loads(den.read_text())
                denoised = _read(Path(d["file"]))
                before, after = matched_psnr(noisy, clean_vol), matched_psnr(denoised, clean_vol)
                out["denoise"] = {
                    "method": d["method"],
                    "psnr_noisy_dB": before,
                    "psnr_denoised_dB": after,
                    "psnr_gain_dB": after - before,
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def evaluate(
    ts: sess.TiltSeries, ws: proc.Workspace, truth: GroundTruth, scope: Microscope, settings
) -> dict:
    """All figures for one simulated tilt series (also written to ``evaluation/evaluation.json``)."""
    figures: dict = {"stack": truth.stack}
    figures.update(ctf_figures(ws.json("ctf", "ctf.json")["tilts"], truth))
    figures.update(drift_figures(ws.json("motioncorr", "motion.json"), truth))
    corrected = (ws.step("motioncorr") / "corrected.mrc").is_file()  # aligned the movie sums
    figures.update(alignment_figures(ws.json("alignment", "alignment.json"), truth, corrected))
    tomo = ws.json("tomogram", "tomogram.json")
    figures.update(tomogram_figures(ts, ws, truth, scope, tomo, settings))
    main = tomo["methods"][0]
    if f"fsc_{main}" in figures and "fsc_unaligned" in figures:
        for threshold in ("0.143", "0.5"):
            figures[f"fsc_{threshold}_aligned_A"] = figures[f"fsc_{main}"][f"fsc_{threshold}_A"]
            figures[f"fsc_{threshold}_unaligned_A"] = figures["fsc_unaligned"][f"fsc_{threshold}_A"]
    with ws.staged("evaluation") as out:
        proc._dump(out / "evaluation.json", figures)
    return figures


# ---------------------------------------------------------------------------------------------------
# The blocking checks: one per figure

# check name -> (figure, what it demands)
CHECKS = {
    "defocus_error": (
        "defocus_error_pct_median",
        "Median |defocus error| over tilts < 1 % of the true defocus.",
    ),
    "astigmatism_angle": (
        "astigmatism_angle_error_deg_max",
        "Astigmatism angle within 5° on every tilt whose true astigmatism > 500 Å.",
    ),
    "drift_error": ("drift_rms_error_px", "Frame drift RMS error < 0.5 px (means removed)."),
    "shift_error": (
        "shift_rms_error_px",
        "Tilt-series shifts RMS error < 1 px (translation and z-offset gauge removed).",
    ),
    "tilt_axis_error": ("tilt_axis_error_deg", "Tilt-axis angle within 0.5° of the truth."),
}

# which step a failed check points at
FIXES = {
    "defocus_error": "CTF estimate (cryo/ctf)",
    "astigmatism_angle": "CTF estimate's astigmatism (cryo/ctf)",
    "drift_error": "motion correction (cryo/motion_corrected)",
    "shift_error": "tilt-series alignment (cryo/tilt_alignment)",
    "tilt_axis_error": "tilt-axis estimate (cryo/tilt_alignment)",
}

# every check, with what it demands
CHECK_DESCRIPTIONS = {
    **{name: demand for name, (_, demand) in CHECKS.items()},
    "fsc_better_than_unaligned": "FSC(0.143) resolution against the phantom is finer for the aligned "
    "tomogram than for the nominal-geometry one.",
    "denoise_gain": "Denoising raises PSNR against the noiseless reconstruction.",
}


@dataclasses.dataclass(frozen=True)
class CheckVerdict:
    """One check's outcome, in words a check result shows: ``measured`` against ``limit`` and, failed, the
    ``fix``; or, when the check cannot tell (``metadata["not_applicable"]`` says why), ``description``."""

    name: str
    passed: bool
    metadata: dict[str, Any]
    measured: str = ""
    limit: str = ""
    fix: str = ""
    description: str | None = None

    @property
    def applicable(self) -> bool:
        return "not_applicable" not in self.metadata


def finite(value: float | None) -> float:
    """A figure as a number to report: -1 when it was not measured (None, NaN or infinite)."""
    return value if value is not None and math.isfinite(value) else -1.0


def check_verdicts(fig: dict) -> list[CheckVerdict]:
    """Every check of one tilt series' figures (:func:`evaluate`), in the order of
    :data:`CHECK_DESCRIPTIONS`."""
    out = []
    for name, (figure, _) in CHECKS.items():
        value, limit = fig.get(figure), THRESHOLDS[figure]
        metadata: dict[str, Any] = {"value": finite(value), "limit": limit, "figure": figure}
        if figure.startswith("astigmatism") and fig.get("astigmatic_tilts") == 0:
            # the truth has no tilt astigmatic enough (> 500 Å) for its angle to mean anything
            metadata["not_applicable"] = f"no tilt with astigmatism > {ASTIGMATISM_MIN_A:.0f} Å"
            out.append(
                CheckVerdict(
                    name,
                    True,
                    metadata,
                    description=f"Not applicable: {metadata['not_applicable']} in the ground truth.",
                )
            )
            continue
        passed = value is not None and math.isfinite(value) and value < limit
        shown = f"{value:.3g}" if value is not None and math.isfinite(value) else "not measured"
        out.append(
            CheckVerdict(
                name,
                passed,
                metadata,
                measured=f"{figure} = {shown}, measured against ground_truth.json",
                limit=f"< {limit:g}",
                fix=f"the {FIXES[name]} disagrees with the simulation's truth: look at the per-tilt figures "
                "in this asset's `figures`, and at the step's own asset, before trusting its output",
            )
        )
    out.append(fsc_check(fig))
    gain = fig.get("denoise", {}).get("psnr_gain_dB")
    out.append(
        CheckVerdict(
            "denoise_gain",
            gain is not None and gain > 0,
            {"psnr_gain_dB": finite(gain), "limit_dB": 0.0},
            measured=f"denoising changed the PSNR against the phantom by {gain:+.2f} dB"
            if gain is not None
            else "the PSNR gain of the denoising was not measured",
            limit="> 0 dB",
            fix="the denoised tomogram is no closer to the truth than the raw one: check cryo/denoised's "
            "method and settings",
        )
    )
    return out


def fsc_check(fig: dict) -> CheckVerdict:
    """Aligned finer than unaligned at FSC 0.143, else at 0.5. A small stack's two tomograms can both stay
    above 0.143 up to the grid's Nyquist limit, where the resolution is the same number for both: then the
    0.5 threshold decides, and when it ties too the check cannot tell them apart (passed, not applicable)."""
    name = "fsc_better_than_unaligned"
    a, u = fig.get("fsc_0.143_aligned_A"), fig.get("fsc_0.143_unaligned_A")
    metadata: dict[str, Any] = {"aligned_A": finite(a), "unaligned_A": finite(u)}
    fix = "alignment did not improve the tomogram: check cryo/tilt_alignment's fiducials and residuals"
    if a is None or u is None or a != u:
        return CheckVerdict(
            name,
            a is not None and u is not None and a < u,
            metadata,
            measured=f"resolution at FSC 0.143: aligned {_angstrom(a)}, nominal geometry {_angstrom(u)}",
            limit="aligned finer",
            fix=fix,
        )
    a5, u5 = fig.get("fsc_0.5_aligned_A"), fig.get("fsc_0.5_unaligned_A")
    metadata.update(aligned_fsc_0_5_A=finite(a5), unaligned_fsc_0_5_A=finite(u5))
    if a5 is not None and u5 is not None and a5 != u5:
        return CheckVerdict(
            name,
            a5 < u5,
            metadata,
            measured=f"both resolve to {a:.1f} Å at FSC 0.143; at FSC 0.5: aligned {_angstrom(a5)}, nominal "
            f"geometry {_angstrom(u5)}",
            limit="aligned finer",
            fix=fix,
        )
    metadata["not_applicable"] = (
        f"both tomograms resolve to {a:.1f} Å at FSC 0.143 and 0.5 (the grid's limit)"
    )
    return CheckVerdict(name, True, metadata, description=f"Not applicable: {metadata['not_applicable']}.")


def _angstrom(value) -> str:
    return f"{value:.1f} Å" if value is not None and math.isfinite(value) else "not measured"
