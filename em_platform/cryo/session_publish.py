"""A live session published as a whole, as often as its Dagster partition is materialized: the report
(em_platform.cryo.session_report), the accepted exposures as a RELION 5 project (em_platform.cryo.relion_project)
and the figures the partition's page shows. Reads only what cryo-live stored: nothing is recomputed."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from em_platform.cryo.exposures_db import FAILED, PROCESSED, ExposureStore
from em_platform.cryo.live_sessions import session_folder, session_thresholds
from em_platform.cryo.relion_project import Optics, write_relion_project
from em_platform.cryo.session_figures import session_plots
from em_platform.cryo.session_report import write_session_report

REPORT, RELION = "report", "relion"


@dataclass
class PublishedSession:
    counts: dict[str, int]
    lag_s: dict[str, float]  # processed − complete: p50, p95, max
    report: Path
    relion: Path | None  # None until an exposure is accepted
    plots: dict[str, bytes] = field(default_factory=dict)


def publish_session(
    store: ExposureStore, key: str, roots: dict[str, Path], out: Path, now: datetime
) -> PublishedSession:
    """Write ``out``'s report and RELION project of session ``key``; what its page shows."""
    root, folder = session_folder(roots, key)
    thresholds = session_thresholds(root, folder)
    rows = store.rows(key)
    shown = [r | {k: str(out / r[k]) if r[k] else None for k in ("thumbnail", "spectrum")} for r in rows]
    report = write_session_report(out / REPORT, key, shown, thresholds.as_dict(), now)
    accepted = [r for r in rows if r["status"] == PROCESSED and r["accepted"]]
    relion = None
    if accepted:
        movies = [r | {"movie": r["movie_path"], "micrograph": str(out / r["micrograph"])} for r in accepted]
        first = accepted[0]
        optics = Optics(
            pixel_A=first["pixel_a"],
            voltage_kV=first["voltage_kv"],
            dose_per_frame_e_per_A2=first["dose_per_frame_e_per_a2"],
        )
        write_relion_project(out / RELION, movies, optics)
        relion = out / RELION
    processed = [r for r in rows if r["status"] == PROCESSED]
    lags = np.array([(r["processed_at"] - r["acquired_at"]).total_seconds() for r in processed])
    counts = {
        "exposures": len(rows),
        "processed": len(processed),
        "failed": sum(r["status"] == FAILED for r in rows),
        "waiting": sum(r["status"] not in (PROCESSED, FAILED) for r in rows),
        "accepted": len(accepted),
    }
    lag = (
        {
            "p50": float(np.percentile(lags, 50)),
            "p95": float(np.percentile(lags, 95)),
            "max": float(lags.max()),
        }
        if len(lags)
        else {}
    )
    return PublishedSession(counts, lag, report, relion, session_plots(shown, now, thresholds.as_dict()))
