"""A cryo session folder as a microscope writes it: tilt series (SerialEM/Tomo5 ``.mdoc`` + stack and/or movies),
single-particle movie sets, gain references — discovered, described and read with checks that name the file.

Layout (the simulator/processing contract): one ``*.mdoc`` per tilt series with the stack (``<name>.mrc`` /
``.st``) beside it; movies referenced by ``SubFramePath`` (a Windows path: only the basename counts) found in
the mdoc's folder, the session folder, or a ``frames``/``Frames`` sub-folder of either; a gain reference
when frames are raw counts, chosen by the rule of :mod:`em_platform.cryo.gain_reference`; ground truth, when simulated, in
``ground_truth.json`` (or ``<name>.ground_truth.json``) beside the mdoc. A folder of per-movie frame-set mdocs
(``[FrameSet = 0]``, SerialEM's single-particle output) is one single-particle micrograph set.

Partition keys are ``<root tag>/<path of the mdoc (or set folder) under the root, suffixes dropped>``.

A session folder is an edge (:mod:`em_platform.edge`), under the inbox's rule: every folder walked and every
file a series names (mdoc, stack, movies, gain reference, ground truth, settings, raw tilt angles) must resolve
inside its root, symlinks followed (:func:`~em_platform.edge.inside`). A symlink that stays inside is followed: it
can show nothing the root does not hold. One that points out is refused before anything behind it is read: the
folder, or the whole series, comes back refused (:func:`scan_sessions`; the sensor dead-letters it) with the
field and the reason, and a run that asks for such a series fails with the same refusal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

from em_platform.cryo.gain_reference import GainReference, discover_gain
from em_platform.cryo.session_folders import SPA_SET, contained, is_frame_set, list_folder
from em_platform.edge import Refused
from em_platform.formats.errors import FormatError

if TYPE_CHECKING:
    from em_platform.cryo.frame_sets import FrameSetWatch

STACK_SUFFIXES = (".mrc", ".st", ".mrcs", ".ali")
MOVIE_SUFFIXES = (".tif", ".tiff", ".mrc", ".mrcs")


class SessionError(ValueError):
    """A session file is missing, truncated or inconsistent; the message names the file and the fault."""


@dataclass(frozen=True)
class Tilt:
    z_index: int  # section of the stack (acquisition order)
    angle_deg: float  # nominal
    dose_e_per_A2: float
    accumulated_dose_e_per_A2: float
    nominal_defocus_A: float | None  # positive = underfocus
    movie: Path | None = None
    movie_name: str | None = None  # SubFramePath basename (kept when the file is missing)
    n_frames: int | None = None  # NumSubFrames
    frame_dose_e_per_A2: float | None = None


@dataclass(frozen=True)
class TiltSeries:
    key: str
    name: str
    kind: str  # "tilt_series" or "single_particle"
    mdoc: Path | None
    stack: Path | None
    pixel_A: float
    voltage_kV: float
    tilt_axis_deg: float
    tilts: tuple[Tilt, ...]
    gain: Path | None = None  # the gain reference the session's rule chose (gain_reference module)
    truth: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    gain_found: GainReference | None = None  # what the mdoc and the session layout said about it
    axis_source: str = "mdoc title"  # where tilt_axis_deg came from (AXIS_PRECEDENCE)
    thickness_nm: float | None = None  # the session's em_session.yaml, when it sets one
    settings_file: Path | None = None  # that file, when there is one

    @property
    def has_movies(self) -> bool:
        return any(t.movie_name for t in self.tilts)

    @property
    def angles_deg(self) -> np.ndarray:
        return np.array([t.angle_deg for t in self.tilts])


# ---------------------------------------------------------------------------------------------------
# mdoc


def read_mdoc(path: Path):
    """Parse with ``mdocfile`` (its chatter about renamed fields silenced); errors name the file."""
    from mdocfile.data_models import Mdoc

    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
            return Mdoc.from_file(path)
    except FileNotFoundError:
        raise SessionError(f"{path}: mdoc file not found") from None
    except Exception as exc:
        raise SessionError(f"{path}: not a readable SerialEM mdoc ({exc})") from exc


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


SESSION_SETTINGS = "em_session.yaml"
SESSION_KEYS = {
    "tilt_axis_deg": "the tilt-axis angle (°), over the mdoc's",
    "thickness_nm": "tomogram thickness (nm)",
    "curation": "a live session's thresholds (em_platform.cryo.curation.Thresholds), a mapping",
}
# where the tilt-axis angle comes from, first that applies (README, "Cryo processing")
AXIS_PRECEDENCE = ("session settings", "mdoc title", "mdoc RotationAngle", "none: 0° assumed")


def session_settings(mdoc_dir: Path, session_dir: Path, root: Path | None = None) -> tuple[dict, Path | None]:
    """The operator's settings of a session: ``em_session.yaml`` beside the mdoc, else in the session folder
    (for every series under it). Unknown keys and non-numbers are errors naming the file (``curation`` is a
    mapping of thresholds, em_platform.cryo.curation); with ``root``, a file that resolves outside it is
    refused before it is read."""
    for folder in (mdoc_dir, session_dir):
        path = folder / SESSION_SETTINGS
        if not path.is_file():
            continue
        if root is not None:
            contained(root, path, "session settings")
        import yaml

        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SessionError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(doc, dict):
            raise SessionError(f"{path}: expected a mapping of settings ({', '.join(SESSION_KEYS)})")
        unknown = sorted(set(doc) - set(SESSION_KEYS))
        if unknown:
            raise SessionError(f"{path}: unknown setting(s) {unknown}; known: {', '.join(SESSION_KEYS)}")
        out: dict[str, Any] = {}
        for key, value in doc.items():
            if key == "curation":
                from em_platform.cryo.curation import CurationError, Thresholds

                try:
                    out[key] = Thresholds.from_settings(value, f"{path}: curation")
                except CurationError as exc:
                    raise SessionError(str(exc)) from exc
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise SessionError(f"{path}: {key} must be a number ({SESSION_KEYS[key]}), got {value!r}")
            out[key] = float(value)
        if out.get("thickness_nm", 1.0) <= 0:
            raise SessionError(f"{path}: thickness_nm must be positive, got {out['thickness_nm']}")
        return out, path
    return {}, None


def _rotation_angle(sections) -> float | None:
    """SerialEM's per-image ``RotationAngle`` (the tilt axis' angle in the image), median over tilts."""
    values = [float(s.RotationAngle) for s in sections if getattr(s, "RotationAngle", None) is not None]
    return float(np.median(values)) if values else None


def _rawtlt(mdoc: Path, name: str, root: Path) -> list[float] | None:
    """IMOD's raw tilt angles beside the mdoc (``<name>.rawtlt``), one per line in stack order."""
    path = mdoc.parent / f"{name}.rawtlt"
    if not path.is_file():
        return None
    contained(root, path, "raw tilt angles")
    try:
        return [float(line) for line in path.read_text().split()]
    except ValueError as exc:
        raise SessionError(f"{path}: not a list of tilt angles ({exc})") from exc


def _axis_from_titles(titles) -> float | None:
    for t in titles or []:
        m = re.search(r"Tilt\s*axis\s*angle\s*=\s*([-+\d.eE]+)", str(t))
        if m:
            return float(m.group(1))
    return None


def _defocus_A(section) -> float | None:
    """Nominal defocus (Å, positive = underfocus) from SerialEM's µm with negative = underfocus."""
    for name in ("TargetDefocus", "Defocus"):
        v = getattr(section, name, None)
        if v is not None:
            return -float(v) * 1e4
    return None


def _frame_count(section) -> int | None:
    """Frames of a section's movie: ``NumSubFrames``, else the total of ``FrameDosesAndNumber``'s counts."""
    if section.NumSubFrames:
        return int(section.NumSubFrames)
    if section.FrameDosesAndNumbers:
        return int(sum(int(n) for _, n in section.FrameDosesAndNumbers)) or None
    return None


def _search_dirs(mdoc_dir: Path, session_dir: Path) -> list[Path]:
    dirs = []
    for base in (mdoc_dir, session_dir):
        for d in (base, base / "frames", base / "Frames"):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        p = d / name
        if p.is_file():
            return p
    return None


def _gain_fields(dirs: list[Path], named: str | None, movies: bool) -> dict:
    """``gain`` and ``gain_found`` of a series (the rule: em_platform.cryo.gain_reference)."""
    if not movies:
        return {}
    found = discover_gain(dirs, named)
    return {"gain": found.path, "gain_found": found}


def _stack_for(mdoc: Path, image_file: str | None) -> Path | None:
    base = mdoc.with_suffix("")  # X.mrc.mdoc → X.mrc
    candidates = [base] if base.suffix.lower() in STACK_SUFFIXES else []
    candidates += [base.with_suffix(s) for s in STACK_SUFFIXES]
    if image_file:
        candidates.append(mdoc.parent / PureWindowsPath(str(image_file)).name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def _truth_for(mdoc: Path, name: str) -> Path | None:
    for c in (mdoc.parent / "ground_truth.json", mdoc.parent / f"{name}.ground_truth.json"):
        if c.is_file():
            return c
    return None


def strip_suffixes(name: str) -> str:
    for suffix in (".mdoc", *STACK_SUFFIXES):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


SIMULATION_TAG = "simulation"  # the simulator's published root (<data root>/simulation/<spec>/<stack>/)


def series_key(tag: str, folders: tuple[str, ...], name: str) -> str:
    """A tilt series' partition key: ``<tag>/<folders>/<name>``, the name said once when its folder bears it
    (``sessions/grid1/TS_01/TS_01.mdoc`` → ``sessions/grid1/TS_01``). A simulated stack
    (``<spec>/<stack>/<stack>.mdoc``) is named as its ``simulation/tilt_series`` partition is (``<stack>``),
    so the two assets are one lineage, partition to partition (no ``/``: never a session's key)."""
    if tag == SIMULATION_TAG and len(folders) == 2 and folders[1] == name:
        return name
    if folders and folders[-1] == name:
        folders = folders[:-1]
    return "/".join((tag, *folders, name))


def _refuse_outside(root: Path, named: Iterable[tuple[str, Path | None]]) -> None:
    for what, path in named:
        if path is not None:
            contained(root, path, what)


def describe_tilt_series(mdoc: Path, root: Path, tag: str) -> TiltSeries:
    """A tilt series from its mdoc (no pixels read); raises SessionError naming the mdoc, and
    :class:`~em_platform.edge.Refused` for a file of it that resolves outside ``root``."""
    contained(root, mdoc, "mdoc")
    doc = read_mdoc(mdoc)
    sections = sorted(doc.section_data, key=lambda s: s.ZValue if s.ZValue is not None else 0)
    if not sections:
        raise SessionError(f"{mdoc}: the mdoc lists no tilts ([ZValue = ...] sections)")
    g = doc.global_data
    pixel = g.PixelSpacing or sections[0].PixelSpacing
    if not pixel:
        raise SessionError(f"{mdoc}: no PixelSpacing in the header or the first section")
    rel = mdoc.relative_to(root)
    session_dir = root / rel.parts[0] if len(rel.parts) > 1 else root
    dirs = _search_dirs(mdoc.parent, session_dir)
    name = strip_suffixes(mdoc.name)
    settings, settings_file = session_settings(mdoc.parent, session_dir, root)
    rawtlt = _rawtlt(mdoc, name, root) if any(s.TiltAngle is None for s in sections) else None
    tilts, accumulated = [], 0.0
    for i, s in enumerate(sections):
        z = int(s.ZValue) if s.ZValue is not None else i
        if s.TiltAngle is not None:
            angle = float(s.TiltAngle)
        elif rawtlt is not None and z < len(rawtlt):
            angle = rawtlt[z]
        else:
            raise SessionError(
                f"{mdoc}: ZValue {z} has no TiltAngle and there is no {name}.rawtlt beside it to give one"
            )
        movie_name = PureWindowsPath(str(s.SubFramePath)).name if s.SubFramePath else None
        dose = float(s.ExposureDose or 0.0)
        frame_dose = None
        if s.FrameDosesAndNumbers:
            frame_dose = float(s.FrameDosesAndNumbers[0][0])
        elif s.NumSubFrames and dose:
            frame_dose = dose / int(s.NumSubFrames)
        tilts.append(
            Tilt(
                z_index=z,
                angle_deg=angle,
                dose_e_per_A2=dose,
                accumulated_dose_e_per_A2=accumulated,
                nominal_defocus_A=_defocus_A(s),
                movie=_find(movie_name, dirs) if movie_name else None,
                movie_name=movie_name,
                n_frames=_frame_count(s),
                frame_dose_e_per_A2=frame_dose,
            )
        )
        accumulated += dose
    candidates = (settings.get("tilt_axis_deg"), _axis_from_titles(doc.titles), _rotation_angle(sections))
    found = [(src, a) for src, a in zip(AXIS_PRECEDENCE, candidates, strict=False) if a is not None]
    source, axis = found[0] if found else (AXIS_PRECEDENCE[-1], None)
    notes = [] if found else ["no tilt-axis angle (em_session.yaml, mdoc title, RotationAngle): 0° assumed"]
    named_gain = getattr(sections[0], "GainReference", None)
    series = TiltSeries(
        key=series_key(tag, rel.parent.parts, name),
        name=name,
        kind="tilt_series",
        mdoc=mdoc,
        stack=_stack_for(mdoc, str(g.ImageFile) if g.ImageFile else None),
        pixel_A=float(pixel),
        voltage_kV=float(g.Voltage or 300.0),
        tilt_axis_deg=float(axis or 0.0),
        tilts=tuple(tilts),
        truth=_truth_for(mdoc, name),
        notes=tuple(notes),
        axis_source=source,
        thickness_nm=settings.get("thickness_nm"),
        settings_file=settings_file,
        **_gain_fields(dirs, named_gain, any(t.movie_name for t in tilts)),
    )
    _refuse_outside(root, _named_files(series))
    return series


def _named_files(ts: TiltSeries) -> list[tuple[str, Path | None]]:
    """The files a series names besides its mdoc, by the field a refusal names."""
    named = [("stack", ts.stack), ("gain reference", ts.gain), ("ground truth", ts.truth)]
    return named + [("movie", t.movie) for t in ts.tilts]


def describe_movie_set(folder: Path, mdocs: list[Path], root: Path, tag: str) -> TiltSeries:
    """A single-particle set: the movies of a folder's frame-set mdocs, in name order, as 0° 'tilts'; a file
    of it that resolves outside ``root`` raises :class:`~em_platform.edge.Refused`."""
    contained(root, folder, "session folder")
    _refuse_outside(root, (("mdoc", path) for path in mdocs))
    tilts, pixel, voltage, gain_name = [], None, 300.0, None
    rel = folder.relative_to(root)
    session_dir = root / rel.parts[0] if rel.parts else root
    dirs = _search_dirs(folder, session_dir)
    for i, path in enumerate(sorted(mdocs)):
        doc = read_mdoc(path)
        s = doc.section_data[0]
        pixel = pixel or s.PixelSpacing or doc.global_data.PixelSpacing
        voltage = float(doc.global_data.Voltage or voltage)
        gain_name = gain_name or getattr(s, "GainReference", None)
        movie_name = (
            PureWindowsPath(str(s.SubFramePath)).name if s.SubFramePath else path.name[: -len(".mdoc")]
        )
        dose = float(s.ExposureDose or 0.0)
        fd = float(s.FrameDosesAndNumbers[0][0]) if s.FrameDosesAndNumbers else None
        tilts.append(
            Tilt(
                i,
                0.0,
                dose,
                0.0,
                _defocus_A(s),
                _find(movie_name, dirs + [path.parent]),
                movie_name,
                _frame_count(s),
                fd,
            )
        )
    if not pixel:
        raise SessionError(f"{folder}: the frame-set mdocs give no PixelSpacing")
    key_path = "/".join((*rel.parts, SPA_SET))
    series = TiltSeries(
        key=f"{tag}/{key_path}",
        name=folder.name or tag,
        kind="single_particle",
        mdoc=None,
        stack=None,
        pixel_A=float(pixel),
        voltage_kV=voltage,
        tilt_axis_deg=0.0,
        tilts=tuple(tilts),
        **_gain_fields(dirs, gain_name, True),
    )
    _refuse_outside(root, _named_files(series))
    return series


def _is_frame_set_inside(path: Path, root: Path) -> bool:
    """:func:`is_frame_set`, the file checked inside ``root`` before it is read."""
    contained(root, path, "mdoc")
    return is_frame_set(path)


@dataclass(frozen=True)
class RefusedEntry:
    """A folder or series of a session root refused at the edge: never described further, never processed."""

    key: str  # the series' partition key, or ``<tag>/<folder>`` for a folder
    path: Path  # the mdoc, the set's folder or the folder refused
    refused: Refused

    @property
    def fingerprint(self) -> str:
        """Changes when the refusal does (another target, another file): reported once per version."""
        return hashlib.sha256(f"{self.path}\0{self.refused}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SessionScan:
    found: list[TiltSeries]
    errors: dict[str, str]  # key -> why the series could not be described (a bad mdoc, a missing file)
    refused: dict[str, RefusedEntry]  # key -> what resolves outside the root
    movie_set_folders: list[Path] = field(default_factory=list)  # when not described (scan_sessions)


def _walk(root: Path) -> tuple[list[Path], list[tuple[Path, Refused]]]:
    """Every ``*.mdoc`` under ``root``, hidden names left out, and the folders refused on the way.

    A symlinked folder is walked while it resolves inside ``root`` (one that leads back to a folder above it is
    not walked twice) and refused when it points out: nothing behind it is listed."""
    mdocs: list[Path] = []
    refused: list[tuple[Path, Refused]] = []
    pending = [(root, frozenset({root.resolve()}))]
    while pending:
        folder, above = pending.pop()
        listing = list_folder(root, folder)
        if listing is None:
            continue
        mdocs += [folder / name for name in listing.mdocs]
        refused += listing.refused
        pending += [(path, above | {real}) for path, real in listing.folders if real not in above]
    return sorted(mdocs), refused


def scan_sessions(root: Path, tag: str, watch: FrameSetWatch | None = None) -> SessionScan:
    """Every tilt series and movie set under ``root``; unreadable mdocs come back as errors, and what resolves
    outside ``root`` (a folder, an mdoc, a file a series names) as refused, checked before it is read.

    With a ``watch`` of ``root`` (the sensor's, kept between ticks) the root is walked through it: only the
    folders that changed are listed again and only the mdocs new to it are read, so a tick over a session of
    tens of thousands of movies costs what landed since the last; a movie set's folder is then only named
    (``SessionScan.movie_set_folders``): the live service processes its exposures (em_platform.cryo.live_sessions)."""
    found: list[TiltSeries] = []
    errors: dict[str, str] = {}
    refused: dict[str, RefusedEntry] = {}
    if not root.is_dir():
        return SessionScan(found, errors, refused)
    frame_sets: dict[Path, list[Path]] = {}
    if watch is None:
        mdocs, folders = _walk(root)
    else:
        walked = watch.scan()
        mdocs, folders = walked.others, walked.refused
        frame_sets = {folder: [] for folder in walked.set_folders}
    for folder, exc in folders:
        key = f"{tag}/{folder.relative_to(root).as_posix()}"
        refused[key] = RefusedEntry(key, folder, exc)
    for mdoc in mdocs:
        try:
            if watch is None and _is_frame_set_inside(mdoc, root):
                frame_sets.setdefault(mdoc.parent, []).append(mdoc)
            else:
                found.append(describe_tilt_series(mdoc, root, tag))
        except Refused as exc:
            key = series_key(tag, mdoc.relative_to(root).parent.parts, strip_suffixes(mdoc.name))
            refused[key] = RefusedEntry(key, mdoc, exc)
        except (SessionError, OSError) as exc:
            rel = mdoc.relative_to(root)
            errors[f"{tag}/{'/'.join((*rel.parent.parts, strip_suffixes(mdoc.name)))}"] = str(exc)
    if watch is not None:
        return SessionScan(found, errors, refused, sorted(frame_sets))
    for folder, mdocs_of_set in sorted(frame_sets.items()):
        key = f"{tag}/{folder.relative_to(root).as_posix()}/{SPA_SET}"
        try:
            found.append(describe_movie_set(folder, mdocs_of_set, root, tag))
        except Refused as exc:
            refused[key] = RefusedEntry(key, folder, exc)
        except (SessionError, OSError) as exc:
            errors[key] = str(exc)
    return SessionScan(found, errors, refused)


def discover(root: Path, tag: str) -> tuple[list[TiltSeries], dict[str, str]]:
    """Every tilt series and movie set under ``root``; unreadable and refused ones come back as {key: error}
    (:func:`scan_sessions` keeps the refusals apart)."""
    scan = scan_sessions(root, tag)
    return scan.found, {**scan.errors, **{key: str(r.refused) for key, r in scan.refused.items()}}


def fingerprint(ts: TiltSeries) -> str:
    """Changes whenever the mdoc, the stack or any movie changes (size or modification time)."""
    parts = []
    for p in [ts.mdoc, ts.stack, ts.gain, ts.settings_file, *(t.movie for t in ts.tilts)]:
        if p is not None and p.exists():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    parts.append(f"missing:{sum(1 for t in ts.tilts if t.movie_name and t.movie is None)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def newest_change(ts: TiltSeries) -> float:
    """Modification time (s) of the newest of the series' files: a session still being written is not settled."""
    times = [p.stat().st_mtime for p in [ts.mdoc, ts.stack, *(t.movie for t in ts.tilts)] if p and p.exists()]
    return max(times, default=0.0)


# ---------------------------------------------------------------------------------------------------
# Pixels


def _read_array(path: Path, what: str):
    """A lazy (dask) array of an MRC or TIFF file; truncated/corrupt files raise SessionError."""
    from em_platform.formats.mrc import read_mrc
    from em_platform.formats.tiff import read_tiff

    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            vol = read_tiff(path)
        elif suffix == ".dm4" or suffix == ".dm3":
            from em_platform.formats.dm import read_dm

            vol = read_dm(path)
        else:
            vol = read_mrc(path)
    except FormatError as exc:
        raise SessionError(f"{what} {path}: {exc}") from exc
    except Exception as exc:
        raise SessionError(f"{what} {path}: unreadable ({exc})") from exc
    return vol


def load_stack(ts: TiltSeries):
    """The tilt series' stack as a dask array (n, ny, nx), checked against the mdoc's tilt list."""
    if ts.stack is None:
        assert ts.mdoc is not None  # a stack belongs to a tilt series, which has an mdoc
        raise SessionError(
            f"{ts.mdoc}: no stack beside the mdoc (expected {strip_suffixes(ts.mdoc.name)}.mrc or .st)"
        )
    vol = _read_array(ts.stack, "tilt-series stack")
    data = vol.data
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise SessionError(f"tilt-series stack {ts.stack}: expected (n, ny, nx), got {data.shape}")
    if data.shape[0] != len(ts.tilts):
        raise SessionError(
            f"tilt-series stack {ts.stack} has {data.shape[0]} sections but its mdoc {ts.mdoc} lists "
            f"{len(ts.tilts)} tilts: the mdoc's tilt list disagrees with the stack (acquisition not finished, "
            "or the wrong mdoc)"
        )
    bad = [t.z_index for t in ts.tilts if not 0 <= t.z_index < data.shape[0]]
    if bad:
        raise SessionError(f"{ts.mdoc}: ZValue {bad[0]} is outside the stack's {data.shape[0]} sections")
    return data


def load_movie(ts: TiltSeries, tilt: Tilt):
    """One tilt's movie (n_frames, ny, nx) as a dask array, its frame count checked against the mdoc."""
    where = ts.mdoc or "the frame-set mdoc"
    if tilt.movie is None:
        raise SessionError(
            f"movie {tilt.movie_name} (SubFramePath of ZValue {tilt.z_index} in {where}) was not found in the "
            "session folder, its frames/ sub-folder or beside the mdoc"
        )
    vol = _read_array(tilt.movie, "movie")
    data = vol.data
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[0] < 1:
        raise SessionError(f"movie {tilt.movie}: expected frames (n, ny, nx), got shape {data.shape}")
    if tilt.n_frames is None:
        raise SessionError(
            f"movie {tilt.movie}: the mdoc {where} gives no frame count (NumSubFrames or "
            f"FrameDosesAndNumber) for ZValue {tilt.z_index}, so a missing frame could not be detected; "
            "add NumSubFrames"
        )
    if data.shape[0] != tilt.n_frames:
        raise SessionError(
            f"movie {tilt.movie} has {data.shape[0]} frames but the mdoc {where} says NumSubFrames = "
            f"{tilt.n_frames} for ZValue {tilt.z_index}: frames are missing (incomplete transfer?)"
        )
    return data


def load_gain(
    path: Path | None, frame_shape: tuple[int, int], rotation: int = 0, flip: int = 0
) -> np.ndarray | None:
    """The gain reference as float32 (ny, nx), turned by ``rotation``/``flip`` (MotionCor2's -RotGain/-FlipGain,
    em_platform.cryo.gain_reference), or None; a wrong shape names the file and both shapes."""
    from em_platform.cryo.gain_reference import orient_gain

    if path is None:
        return None
    vol = _read_array(path, "gain reference")
    gain = np.asarray(vol.data, np.float32)
    if gain.ndim == 3 and gain.shape[0] == 1:
        gain = gain[0]
    gain = orient_gain(gain, rotation, flip)
    if gain.shape != tuple(frame_shape):
        raise SessionError(
            f"gain reference {path} has shape {gain.shape} after rotation {rotation} / flip {flip} but the "
            f"frames are {tuple(frame_shape)} (y, x): wrong gain file for this camera mode, or set "
            "gain_rotation / gain_flip (MotionCor2's -RotGain / -FlipGain) in the cryo/motion_corrected run config"
        )
    if not np.isfinite(gain).all() or (gain <= 0).all():
        raise SessionError(f"gain reference {path}: non-finite or all non-positive values")
    return gain
