"""Which gain reference belongs to a session's movies, and how it is turned to match them.

The rule, first that applies:

1. **Setting**: ``gain_reference`` in the ``cryo/motion_corrected`` run config (or a session's
   ``processing.yaml``), a path relative to the mdoc's folder or absolute.
2. **The mdoc**: SerialEM writes ``GainReference = <file>`` into each section; that file, found in the
   mdoc's folder, the session folder or their ``frames``/``Frames`` sub-folders. Named but not found is an
   error (a gain reference moved away must not be replaced by a guess).
3. **The session layout**: exactly one file matching ``*.gain``, ``*gain*.mrc``, ``CountRef*.dm4`` or
   ``*gain*.dm4`` in those folders. More than one is an error that names them all and says how to choose:
   the first one found, as before, could be last week's reference for another camera mode.

No file at all means the frames are already normalised (or the camera wrote no reference): none is applied.

Orientation, as MotionCor2's ``-RotGain`` / ``-FlipGain``: the reference is rotated counter-clockwise by
``rotation`` × 90° as MRC viewers show it (y up), then flipped (``flip`` 1: upside down, 2: left-right).
Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np

__all__ = ["GAIN_PATTERNS", "GainError", "GainReference", "discover_gain", "orient_gain", "resolve_gain"]

GAIN_PATTERNS = ("*.gain", "*gain*.mrc", "*Gain*.mrc", "CountRef*.dm4", "*gain*.dm4")


class GainError(ValueError):
    """No single gain reference can be chosen, or the one named is missing: the message says what to set."""


@dataclass(frozen=True)
class GainReference:
    path: Path | None  # the reference the rule chose (None: none, or ambiguous)
    rule: str  # "mdoc", "session", "none", "ambiguous", "missing"
    candidates: tuple[Path, ...] = ()  # what the session layout offered
    named: str | None = None  # what the mdoc named


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def discover_gain(dirs: list[Path], named: str | None = None) -> GainReference:
    """What the mdoc and the session layout say (steps 2 and 3 of the rule); never raises."""
    if named:
        name = PureWindowsPath(str(named)).name
        for d in dirs:
            if (d / name).is_file():
                return GainReference(d / name, "mdoc", named=str(named))
        return GainReference(None, "missing", named=str(named))
    candidates = _unique(
        [
            p
            for d in dirs
            if d.is_dir()
            for pattern in GAIN_PATTERNS
            for p in sorted(d.glob(pattern))
            if p.is_file()
        ]
    )
    if len(candidates) == 1:
        return GainReference(candidates[0], "session", tuple(candidates))
    return GainReference(None, "ambiguous" if candidates else "none", tuple(candidates))


def resolve_gain(found: GainReference, setting: str = "", base: Path | None = None) -> Path | None:
    """The reference to apply: the setting (step 1) when given, else what :func:`discover_gain` found;
    raises :class:`GainError` for a missing setting, a missing mdoc-named file or an ambiguous session."""
    if setting:
        path = Path(setting).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise GainError(f"gain_reference {setting!r}: no such file ({path}); fix the setting")
        return path
    if found.rule == "missing":
        raise GainError(
            f"the mdoc names gain reference {found.named!r}, which is not in the session folders; copy it "
            "there or set gain_reference in the cryo/motion_corrected run config"
        )
    if found.rule == "ambiguous":
        names = ", ".join(str(p) for p in found.candidates)
        raise GainError(
            f"{len(found.candidates)} gain references in the session ({names}) and neither the mdoc "
            "(GainReference) nor the settings say which one belongs to these movies; set gain_reference in "
            "the cryo/motion_corrected run config (or the session's processing.yaml)"
        )
    return found.path


def orient_gain(gain: np.ndarray, rotation: int = 0, flip: int = 0) -> np.ndarray:
    """The reference turned to the frames' orientation (module docstring): ``rotation`` 0–3, ``flip`` 0–2."""
    if rotation not in (0, 1, 2, 3) or flip not in (0, 1, 2):
        raise GainError(
            f"gain rotation must be 0-3 and flip 0-2 (MotionCor2's -RotGain/-FlipGain), got {rotation}, {flip}"
        )
    out = np.rot90(gain, -rotation)  # counter-clockwise with y up = clockwise in numpy's row-0-on-top view
    if flip == 1:
        out = out[::-1, :]
    elif flip == 2:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
