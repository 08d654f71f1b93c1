"""A tilt series' tilts motion-corrected as they land: `em-platform cryo-live` corrects each tilt once its movie
reads whole, while the microscope is still tilting, and keeps the result; when the series is complete, its
run (``cryo/motion_corrected``) takes every kept tilt instead of correcting it again, and goes on with the
alignment and the tomogram at once.

A tilt is kept in ``<live root>/<series key>/tilts/<movie>/`` (the corrected, even and odd sums as
``.npy`` and ``tilt.json``) under a fingerprint of everything its result depends on: the movie's and the gain
reference's path, size and modification time, the tilt's dose, the pixel size and voltage, and every motion
setting that changes the result. The run takes a kept tilt only when the fingerprint is the one it would
compute now; a movie written again, another gain or other settings are corrected again. A tilt is written
whole (a folder renamed into place), so a service killed mid-tilt leaves nothing a run could take, and the
next scan corrects it again. Once the run has published its micrographs it removes what was kept of its
tilts, taken or stale. The live service corrects a series' tilts
only until its run has begun (the results database has its row): after that the run owns it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from em_platform.cryo import session as sess
from em_platform.cryo.frame_sets import file_state
from em_platform.cryo.gain_reference import GainReference, resolve_gain
from em_platform.cryo.motion import MotionSettings
from em_platform.cryo.part_files import part_path
from em_platform.edge import inside

IMAGES = ("corrected", "even", "odd")
DOC = "tilt.json"
# settings that change how a movie is read and summed in memory, not the result
_NOT_IN_RESULT = ("threads", "cache_mib", "frames_per_task")


def tilt_fingerprint(ts: sess.TiltSeries, i: int, gain_path: Path | None, settings: MotionSettings) -> str:
    """What tilt ``i``'s correction depends on, as a digest; raises OSError when its movie is not there."""
    tilt = ts.tilts[i]
    if tilt.movie is None:
        raise OSError(f"tilt {i} of {ts.key}: its movie is not there")
    parts = [str(tilt.movie), *file_state(tilt.movie)]
    parts += [str(gain_path), *(file_state(gain_path) if gain_path is not None else ())]
    parts += [tilt.dose_e_per_A2, tilt.accumulated_dose_e_per_A2, tilt.frame_dose_e_per_A2, tilt.n_frames]
    parts += [ts.pixel_A, ts.voltage_kV]
    parts += sorted((k, v) for k, v in asdict(settings).items() if k not in _NOT_IN_RESULT)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def series_gain(ts: sess.TiltSeries, settings: MotionSettings) -> Path | None:
    """The gain reference a series' movies are corrected with (the settings' path over the session's rule)."""
    found = ts.gain_found or GainReference(ts.gain, "session" if ts.gain else "none")
    base = ts.mdoc.parent if ts.mdoc else (ts.tilts[0].movie.parent if ts.tilts[0].movie else None)
    return resolve_gain(found, settings.gain_reference, base)


class LiveTilts:
    """The kept tilts under ``root`` (cryo-live's output root)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, key: str, movie: Path | None) -> Path:
        assert movie is not None, "only a tilt with a movie is kept"  # cryo-live corrects no other
        return inside(self.root, key, "tilts", movie.name, field="tilt series")

    def get(self, ts: sess.TiltSeries, i: int, fingerprint: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """The kept figures and sums of tilt ``i`` if kept under ``fingerprint``, else None."""
        doc = self._doc(ts, i, fingerprint)
        if doc is None:
            return None
        folder = self.folder(ts.key, ts.tilts[i].movie)
        try:
            images = {k: np.load(folder / f"{k}.npy", allow_pickle=False) for k in IMAGES}
        except (OSError, ValueError):
            return None
        return doc["figures"], images

    def holds(self, ts: sess.TiltSeries, i: int, fingerprint: str) -> bool:
        """Tilt ``i`` is kept under ``fingerprint`` (its figures read, not its sums)."""
        return self._doc(ts, i, fingerprint) is not None

    def _doc(self, ts: sess.TiltSeries, i: int, fingerprint: str) -> dict | None:
        """Tilt ``i``'s kept ``tilt.json`` if kept under ``fingerprint``."""
        try:
            doc = json.loads((self.folder(ts.key, ts.tilts[i].movie) / DOC).read_text())
        except (OSError, ValueError):
            return None
        return doc if doc.get("fingerprint") == fingerprint else None

    def put(
        self, ts: sess.TiltSeries, i: int, fingerprint: str, figures: dict, images: dict[str, np.ndarray]
    ) -> Path:
        """Keep tilt ``i``'s result, replacing what was kept; written whole."""
        final = self.folder(ts.key, ts.tilts[i].movie)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = part_path(final)
        shutil.rmtree(staging, ignore_errors=True)  # this process's, left by a write that failed
        staging.mkdir()
        try:
            for k in IMAGES:
                np.save(staging / f"{k}.npy", np.asarray(images[k], np.float32), allow_pickle=False)
            doc = {"fingerprint": fingerprint, "movie": str(ts.tilts[i].movie), "figures": figures}
            (staging / DOC).write_text(json.dumps(doc))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def forget(self, ts: sess.TiltSeries, indices: list[int]) -> None:
        """Remove the kept tilts ``indices`` (a run took them)."""
        for i in indices:
            shutil.rmtree(self.folder(ts.key, ts.tilts[i].movie), ignore_errors=True)
