"""Curation of a live session: each exposure accepted or rejected against the operator's thresholds, with the
rule that rejected it (CryoSPARC Live's and Warp's loop).

The thresholds live in the session's ``em_session.yaml`` under ``curation:`` and may change while the session
runs; judging reads only stored figures, so a changed threshold re-judges the whole session without
recomputing an exposure. Rules are checked in :data:`RULES`' order and the first that fails names the
rejection; a figure not measured (an ice-ring density where the pixel does not reach the ice band) passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


class CurationError(ValueError):
    """A threshold in the session's settings is unknown or not a number; the message names it."""


@dataclass(frozen=True)
class Thresholds:
    """The operator's limits; None switches a rule off. Motion in Å (RELION's _rlnAccumMotion*), defocus
    in µm underfocus, resolution in Å, the CTF figure of merit as CTFFIND's cross-correlation."""

    max_total_motion_a: float | None = 30.0
    max_early_motion_a: float | None = None
    max_ctf_fit_resolution_a: float | None = 8.0
    min_defocus_um: float | None = 0.3
    max_defocus_um: float | None = 4.0
    max_astigmatism_a: float | None = 1000.0
    min_ctf_figure_of_merit: float | None = None
    max_ice_ring_density: float | None = None

    @classmethod
    def from_settings(cls, doc: Mapping[str, Any] | None, where: str = "curation") -> Thresholds:
        """From the ``curation:`` mapping of a session's settings (omitted keys keep their defaults)."""
        if not doc:
            return cls()
        if not isinstance(doc, Mapping):
            raise CurationError(f"{where}: expected a mapping of thresholds ({', '.join(NAMES)})")
        unknown = sorted(set(doc) - set(NAMES))
        if unknown:
            raise CurationError(f"{where}: unknown threshold(s) {unknown}; known: {', '.join(NAMES)}")
        values = {}
        for key, value in doc.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            ):
                raise CurationError(f"{where}: {key} must be a number or null (off), got {value!r}")
            values[key] = None if value is None else float(value)
        return cls(**values)

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


NAMES = tuple(f.name for f in fields(Thresholds))

# (the rule's name, the figure it reads, the test that fails it); the name is what the report counts
RULES: tuple[tuple[str, str, Any], ...] = (
    (
        "total_motion",
        "total_motion_a",
        lambda v, t: t.max_total_motion_a is not None and v > t.max_total_motion_a,
    ),
    (
        "early_motion",
        "early_motion_a",
        lambda v, t: t.max_early_motion_a is not None and v > t.max_early_motion_a,
    ),
    (
        "ctf_fit_resolution",
        "ctf_fit_resolution_a",
        lambda v, t: t.max_ctf_fit_resolution_a is not None and v > t.max_ctf_fit_resolution_a,
    ),
    (
        "defocus_range",
        "defocus_um",
        lambda v, t: (
            (t.min_defocus_um is not None and v < t.min_defocus_um)
            or (t.max_defocus_um is not None and v > t.max_defocus_um)
        ),
    ),
    (
        "astigmatism",
        "astigmatism_a",
        lambda v, t: t.max_astigmatism_a is not None and v > t.max_astigmatism_a,
    ),
    (
        "ctf_figure_of_merit",
        "ctf_figure_of_merit",
        lambda v, t: t.min_ctf_figure_of_merit is not None and v < t.min_ctf_figure_of_merit,
    ),
    (
        "ice_ring_density",
        "ice_ring_density",
        lambda v, t: t.max_ice_ring_density is not None and v > t.max_ice_ring_density,
    ),
)


def judge(figures: Mapping[str, Any], thresholds: Thresholds) -> tuple[bool, str | None]:
    """(accepted, the first rule that rejected it) of one processed exposure's stored figures."""
    for name, figure, fails in RULES:
        value = _figure(figures, figure)
        if value is not None and fails(value, thresholds):
            return False, name
    return True, None


def _figure(figures: Mapping[str, Any], name: str) -> float | None:
    if name == "defocus_um":
        u, v = figures.get("defocus_u_a"), figures.get("defocus_v_a")
        return None if u is None or v is None else (u + v) / 2 / 1e4
    value = figures.get(name)
    return None if value is None or not math.isfinite(value) else float(value)
