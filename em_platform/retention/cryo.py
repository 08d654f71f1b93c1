"""A finished tilt series' re-makeable working files let go; its products kept.

A series' folder (``<work root>/<partition key>/``, :mod:`em_platform.cryo.processing`) holds, for 41 tilts of
4096² (float32, 2.75 GB a stack): the corrected micrographs (``motioncorr/corrected.mrc`` and their RELION copies
``motioncorr/micrographs/``), the even and odd frame sums (``motioncorr/even.mrc``, ``odd.mrc``: two more stacks,
5.5 GB, read once, to make the half tomograms), the aligned binned stack (``tomogram/stack.mrc``, read once, to
reconstruct), the tomograms, half tomograms and denoised volume (a few hundred MB each), and small files (JSON,
STAR, IMOD, PNG, JPEG). Products are what a user or a record names: the corrected micrographs, CTF, alignment,
tomograms, half tomograms (what an even/odd denoiser learns from), the denoised volume, thumbnails, the
OME-Zarr, the results tables. Intermediates, re-made by running the series again (motion correction from the
movies, the stack from the corrected micrographs):

* :data:`INTERMEDIATES`, once the series is complete or failed before the window, no run of it is queued,
  running or ended within it, and the file did not change within it;
* what a killed run left (``.<step>.staging-*``, ``.<step>.old-*``, ``.evaluation-scratch``; a run that fails
  or finishes removes its own), under the same conditions.

Already deleted in the run that makes them: the even/odd binned stacks (``tomogram/stack_even.mrc``,
``stack_odd.mrc``) once each half tomogram is reconstructed, and the evaluation's scratch reconstructions.
Nothing is deleted through a symlink or outside the work root. After the window, ``cryo/tomogram`` run alone
(without ``cryo/motion_corrected``) makes its half tomograms from the even and odd tilts (``halves_from:
tilts`` in ``tomogram.json``), as for a series without movies. Dagster-free: ``retention_job`` passes ``busy``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from em_platform.cryo.results_db import CryoResults
from em_platform.edge import Refused, check_relative_key
from em_platform.retention.files import NotFollowed, changed_since, checked, remove

INTERMEDIATES = ("motioncorr/even.mrc", "motioncorr/odd.mrc", "tomogram/stack.mrc")
LEFT_BY_A_KILLED_RUN = re.compile(r"\.[a-z_]+\.(staging|old)-[0-9a-f]{8}|\.evaluation-scratch")


@dataclass
class CryoReport:
    """Series whose intermediates went, bytes freed, and what was kept because it could not be checked."""

    series: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    refused: list[str] = field(default_factory=list)


def apply_cryo_policy(
    work_root: str | os.PathLike, *, results: CryoResults, before: datetime, busy: Collection[str]
) -> CryoReport:
    """Let go of the intermediates of the series finished before ``before``; idempotent.

    ``busy``: partition keys with a run queued, running, or ended since ``before``.
    """
    report = CryoReport()
    if not Path(work_root).is_dir():
        return report
    moment = before.timestamp()
    for key in results.finished_before(before):
        if key in busy:
            continue
        try:
            check_relative_key(key, "partition_key")
            folder = checked(work_root, key)
        except (Refused, NotFollowed) as exc:
            report.refused.append(f"tilt series {key}: {exc}")
            continue
        if not folder.is_dir():
            continue
        names = [
            *INTERMEDIATES,
            *(e.name for e in os.scandir(folder) if LEFT_BY_A_KILLED_RUN.fullmatch(e.name)),
        ]
        removed = False
        for name in names:
            rel = f"{key}/{name}"
            if not os.path.lexists(Path(work_root, rel)):
                continue
            try:
                path = checked(work_root, rel)
            except NotFollowed as exc:
                report.refused.append(f"tilt series {key}: {exc}")
                continue
            if not changed_since(path, moment):
                report.freed_bytes += remove(path)
                removed = True
        if removed:
            report.series.append(key)
    return report
