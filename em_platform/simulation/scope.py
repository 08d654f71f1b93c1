"""The simulated microscope (``scope-sim``): acquires a montage of a procedural specimen like pyTEM does.

``simulate_montage`` writes real tile files and emits, in acquisition order, the messages a real scope
sends (TEM_comms models, as JSON-ready dicts) through ``emit(topic, payload)``:

1. ``montage.status`` state ``started`` (``total_tiles`` = rows x columns);
2. the reference frames, before the first tile (pyTEM's Brightfield then Darkfield states): one
   ``tile.raw`` each with ``brightfield=True`` or ``darkfield=True``, the montage's id, row = column = −1
   and no stage position;
3. per tile, in raster order: ``tile.raw``, then ``montage.status`` ``in_progress`` (``current_tile`` =
   1-based raster index, throughput and timing fields); a *missing* tile gets neither;
4. ``montage.complete`` (the acquired tiles, a corrupt one included, references and missing ones not);
5. ``montage.status`` ``completed``.

Like a real scope it obeys QC: given ``qc_status`` (the latest ``qc.status`` the platform sent for this
montage), it asks before each tile; ``STOP_NOW`` ends the acquisition there (no more tiles, no
``montage.complete``, a last ``montage.status`` ``cancelled`` naming the reason); ``STOP_AT_END`` lets the
montage finish and is recorded in the ground truth (a scope would not start the next one).

Files (all in ``out_dir``, each written under a temporary name and renamed when complete):
``<tile_id>.tiff`` for tiles and reference frames (uncompressed, like the Allen camera service), and
``ground_truth.json`` (see :class:`GroundTruth`), written before ``montage.complete`` is sent.

Stage positions: ``stage_position`` is what the stage reports: the centre of the tile's field of view in
nm, ``round(R(θ) · (true top-left + readout error + tile_size/2) · pixel_size)``, where the true top-left
is the nominal grid position plus the stage jitter, the readout error is ``N(0, stage_readout_error_px)``
and ``R(θ)`` the stage rotation (``stage_rotation_rad``, sent as ``montage.complete``'s ``rotation_angle``;
0 by default). So stage positions locate tiles to a few pixels; the true positions (ground truth) are for
checking stitching.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from TEM_comms import montage as montage_msgs
from TEM_comms import tile as tile_msgs

from em_platform.simulation.camera import Camera, beam_center_px, blur_sigma_px
from em_platform.simulation.scope_config import ScopeConfig

Emit = Callable[[str, dict[str, Any]], object]  # sends one message; what it returns is not used
QCStatus = Callable[[], "tuple[str, str | None] | None"]

GROUND_TRUTH_FILE = "ground_truth.json"
GROUND_TRUTH_FORMAT = "em_platform/scope-sim-ground-truth/1"
_NAMESPACE = uuid.UUID("6f1c7a52-7d0e-4a8e-9a53-2f5b8e0c9d11")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class TileTruth:
    """One planned tile: where it really was, how it was taken, what went wrong."""

    tile_id: str
    raster_index: int
    row: int
    column: int
    nominal_px: tuple[float, float]  # (x, y) of the top-left pixel on the nominal grid
    position_px: tuple[float, float]  # (x, y) true top-left in the specimen plane
    stage_position_nm: tuple[int, int]  # reported: field-of-view centre incl. the readout error
    defocus_um: float
    blur_sigma_px: float
    faults: list[str]
    path: str | None  # None when the tile is missing
    acquired: bool  # False for a missing tile
    readable: bool  # False for a missing or corrupt tile


@dataclass
class ReferenceTruth:
    tile_id: str
    kind: str  # "brightfield" | "darkfield"
    path: str


@dataclass
class GroundTruth:
    """What really happened in a simulated montage; saved as ``ground_truth.json`` beside the tiles."""

    montage_id: str
    acquisition_id: str
    start_time: str
    config: dict[str, Any]
    pixel_size_nm: float
    tile_size: int
    overlap_px: int
    dtype: str
    dark_offset: float
    bright_level: float
    vignetting: dict[str, Any]
    specimen: dict[str, Any]
    tiles: list[TileTruth]
    references: list[ReferenceTruth]
    format: str = GROUND_TRUTH_FORMAT
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def scope_config(self) -> ScopeConfig:
        return ScopeConfig(**self.config)

    def tile(self, row: int, column: int) -> TileTruth:
        for t in self.tiles:
            if t.row == row and t.column == column:
                return t
        raise KeyError(f"no tile at row {row}, column {column}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        _write_atomic(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        path = Path(path)
        if path.is_dir():
            path = path / GROUND_TRUTH_FILE
        data = json.loads(path.read_text())
        if data.get("format") != GROUND_TRUTH_FORMAT:
            raise ValueError(f"{path} is not a scope-sim ground truth (format {data.get('format')!r})")
        tiles = [
            TileTruth(
                **{
                    **t,
                    "nominal_px": tuple(t["nominal_px"]),
                    "position_px": tuple(t["position_px"]),
                    "stage_position_nm": tuple(t["stage_position_nm"]),
                }
            )
            for t in data.pop("tiles")
        ]
        refs = [ReferenceTruth(**r) for r in data.pop("references")]
        return cls(**data, tiles=tiles, references=refs)


# -- the acquisition ----------------------------------------------------------------------------------------


def simulate_montage(
    config: ScopeConfig,
    out_dir: str | Path,
    emit: Emit,
    *,
    montage_id: str | None = None,
    acquisition_id: str | None = None,
    roi_id: str | None = None,
    now: Callable[[], datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    qc_status: QCStatus | None = None,
) -> GroundTruth:
    """Acquire one simulated montage into ``out_dir`` (created; must not hold another montage).

    ``emit(topic, payload)`` receives every message in order; ``payload`` is the TEM_comms model's
    ``model_dump(mode="json")`` (it validates with ``TEM_comms.topics[topic](**payload)``). Pixels depend
    only on ``config``, not on ``montage_id``; tile ids are derived from the montage id, which defaults to a
    fresh uuid4. ``now``/``sleep`` are the clock and the pacing (``config.rate`` tiles/s). If the run is
    interrupted or fails, a last ``montage.status`` says ``cancelled`` or ``error`` before the exception
    propagates. ``qc_status()`` returns the latest ``(status, reason)`` for the montage, or None.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if (out / GROUND_TRUTH_FILE).exists():
        raise FileExistsError(
            f"{out} already holds a simulated montage ({GROUND_TRUTH_FILE}); give each montage its own directory"
        )
    montage_id = montage_id or str(uuid.uuid4())
    acquisition_id = acquisition_id or str(uuid.uuid5(_NAMESPACE, f"{montage_id}/acquisition"))
    acq = _Acquisition(config, out, emit, montage_id, acquisition_id, roi_id, now, sleep, qc_status)
    return acq.run()


class _Acquisition:
    """One montage being acquired: the state behind the messages."""

    def __init__(
        self,
        config: ScopeConfig,
        out: Path,
        emit: Emit,
        montage_id: str,
        acquisition_id: str,
        roi_id: str | None,
        now: Callable[[], datetime],
        sleep: Callable[[float], None],
        qc_status: QCStatus | None = None,
    ):
        self.c = config
        self.qc_status = qc_status
        self.stopped_by: tuple[str, str | None] | None = None  # the qc.status that ended the acquisition
        self.out = out
        self.emit = emit
        self.montage_id = montage_id
        self.acquisition_id = acquisition_id
        self.roi_id = roi_id
        self.now = now
        self.sleep = sleep
        self.camera = Camera(config)
        self.tiles = _plan_tiles(config, montage_id, config.fault_plan(), out)
        self.start = now()
        self.current = 0  # 1-based raster position of the last tile taken

    def run(self) -> GroundTruth:
        self._status("started", 0)
        try:
            references = self._references()
            self._acquire_tiles()
            truth = self._ground_truth(references)
            truth.save(self.out / GROUND_TRUTH_FILE)  # before montage.complete: whoever reacts finds it
            if self.stopped_by is not None:
                status, reason = self.stopped_by
                self._final_status(
                    "cancelled", f"stopped by QC: {status}" + (f" ({reason})" if reason else "")
                )
                return truth
            self.emit("montage.complete", self._complete())
            self._status("completed", self.c.total_tiles, current_position=self.tiles[-1].stage_position_nm)
        except KeyboardInterrupt:
            self._final_status("cancelled", "acquisition interrupted")
            raise
        except Exception as exc:
            self._final_status("error", f"{type(exc).__name__}: {exc}")
            raise
        return truth

    # -- messages --------------------------------------------------------------------------------------

    def _status(self, state: str, current: int, **extra: Any) -> None:
        msg = montage_msgs.Status(
            montage_id=self.montage_id,
            state=state,
            current_tile=current,
            total_tiles=self.c.total_tiles,
            duration_seconds=(self.now() - self.start).total_seconds(),
            **extra,
        )
        self.emit("montage.status", msg.model_dump(mode="json"))

    def _final_status(self, state: str, message: str) -> None:
        try:
            self._status(state, self.current, error_message=message)
        except Exception:  # the sink itself may be what failed; keep the original error
            pass

    def _raw(self, tile_id: str, row: int, column: int, stage, path: Path, **flags: bool) -> None:
        msg = tile_msgs.Raw(
            tile_id=tile_id,
            montage_id=self.montage_id,
            roi_id=self.roi_id,
            row=row,
            column=column,
            overlap=self.c.overlap_px,
            stage_position=stage,
            path=str(path),
            **flags,
        )
        self.emit("tile.raw", msg.model_dump(mode="json"))

    def _complete(self) -> dict[str, Any]:
        msg = montage_msgs.Complete(
            montage_id=self.montage_id,
            tiles={
                t.tile_id: montage_msgs.Tile(
                    raster_index=t.raster_index,
                    stage_position=t.stage_position_nm,
                    raster_position=(t.column, t.row),
                )
                for t in self.tiles
                if t.acquired
            },
            acquisition_id=self.acquisition_id,
            start_time=self.start,
            pixel_size=self.c.pixel_size_nm,
            rotation_angle=self.c.stage_rotation_rad,
            aperture_centroid=_aperture_centroid(self.c),
        )
        return msg.model_dump(mode="json")

    # -- frames ------------------------------------------------------------------------------------------

    def _references(self) -> list[ReferenceTruth]:
        """Brightfield then darkfield frames, before the first tile (as pyTEM's Acquisition does)."""
        c, refs = self.c, []
        for kind, count, take, stream in (
            ("brightfield", c.brightfield_frames, self.camera.brightfield, 4),
            ("darkfield", c.darkfield_frames, self.camera.darkfield, 5),
        ):
            for i in range(count):
                tile_id = str(uuid.uuid5(_NAMESPACE, f"{self.montage_id}/{kind}/{i}"))
                path = self.out / f"{tile_id}.tiff"
                _write_atomic(path, _tiff_bytes(take(np.random.default_rng([c.seed, stream, i]))))
                self._raw(tile_id, -1, -1, None, path, **{kind: True})
                refs.append(ReferenceTruth(tile_id, kind, str(path)))
        return refs

    def _acquire_tiles(self) -> None:
        c = self.c
        cycles: deque[float] = deque(maxlen=10)
        acquired = 0
        first_at: datetime | None = None
        last_done: datetime | None = None
        remaining = sum(t.acquired for t in self.tiles)
        for t in self.tiles:
            if not t.acquired:
                continue  # a missing tile: never taken, no file, no message
            assert t.path is not None  # an acquired tile has its file
            latest = self.qc_status() if self.qc_status is not None else None
            if latest is not None and latest[0] == "STOP_NOW":
                self.stopped_by = latest
                self._skip_rest(t.raster_index)
                return
            waited = 0.0
            if c.rate > 0 and first_at is not None:  # the n-th tile no earlier than n / rate after the first
                waited = (first_at + timedelta(seconds=acquired / c.rate) - self.now()).total_seconds()
                if waited > 0:
                    self.sleep(waited)
                waited = max(waited, 0.0)
            began = self.now()
            first_at = first_at or began
            data = _tiff_bytes(_take_tile(self.camera, c, t))
            if "corrupt" in t.faults:
                data = data[: len(data) // 2]  # a truncated transfer: the header survives, the pixels do not
            _write_atomic(Path(t.path), data)
            self._raw(t.tile_id, t.row, t.column, t.stage_position_nm, Path(t.path))
            acquired += 1
            remaining -= 1
            self.current = t.raster_index + 1
            done = self.now()
            # a cycle runs from one tile's end to the next one's (the first tile has only its capture)
            if last_done is not None:
                cycles.append((done - last_done).total_seconds())
            last_done = done
            avg_cycle = sum(cycles) / len(cycles) if cycles else (done - began).total_seconds()
            self._status(
                "in_progress",
                self.current,
                avg_cycle_time_ms=avg_cycle * 1000.0,
                stage_move_time_ms=waited * 1000.0,
                capture_time_ms=(done - began).total_seconds() * 1000.0,
                throughput_tiles_per_min=60.0 / avg_cycle if avg_cycle > 0 else None,  # current (last 10)
                estimated_completion=done + timedelta(seconds=remaining * avg_cycle),
                current_position=t.stage_position_nm,
            )

    def _skip_rest(self, first: int) -> None:
        """Tiles from raster index ``first`` on were never taken: QC stopped the scope before them."""
        for t in self.tiles:
            if t.raster_index >= first and t.acquired:
                t.acquired = t.readable = False
                t.path = None
                t.faults = [*t.faults, "not_acquired_qc_stop"]

    def _ground_truth(self, references: list[ReferenceTruth]) -> GroundTruth:
        c = self.c
        qc = self.qc_status() if self.qc_status is not None else None
        return GroundTruth(
            montage_id=self.montage_id,
            acquisition_id=self.acquisition_id,
            start_time=self.start.isoformat(),
            config=c.model_dump(mode="json"),
            pixel_size_nm=c.pixel_size_nm,
            tile_size=c.tile_size,
            overlap_px=c.overlap_px,
            dtype=c.dtype,
            dark_offset=c.dark_offset,
            bright_level=c.bright_level,
            vignetting={
                "model": "1 - strength * (r / r_corner)^2, r from the beam centre, r_corner from the frame "
                "centre to a corner; times a per-pixel gain 1 + N(0, gain_variation); "
                "em_platform.simulation.camera.flat_field(config) rebuilds both",
                "strength": c.vignetting,
                "center_px": list(beam_center_px(c)),
                "r_corner_px": math.sqrt(2.0) * (c.tile_size - 1) / 2.0,
                "gain_variation": c.gain_variation,
            },
            specimen={
                "seed": c.specimen_seed_value,
                "model": "em_platform.simulation.specimen.Specimen (procedural stained neuropil)",
                "mean_transmission": self.camera.mean_transmission,
            },
            tiles=self.tiles,
            references=references,
            notes={
                "position_px": "true plane position (x, y) of the tile's top-left pixel; tile pixel (i, j) "
                "shows plane point (x + j, y + i)",
                "stage_position_nm": "reported by the stage: field-of-view centre, R(stage_rotation_rad) · "
                "(position_px + readout error + tile_size / 2) * pixel_size_nm, rounded",
                "counts": "dark_offset + bright_level * exposure * vignetting * gain * transmission + noise",
                **({"qc_status": f"{qc[0]}" + (f" ({qc[1]})" if qc[1] else "")} if qc else {}),
                **({"stopped_by_qc": self.stopped_by[0]} if self.stopped_by else {}),
            },
        )


def _plan_tiles(
    c: ScopeConfig, montage_id: str, plan: dict[int, frozenset[str]], out: Path
) -> list[TileTruth]:
    """Positions, defocus and faults of every planned tile (independent of which tiles get acquired)."""
    n = c.total_tiles
    stage = np.random.default_rng([c.seed, 1])
    jitter = stage.uniform(-c.jitter_px, c.jitter_px, size=(n, 2)) if c.jitter_px > 0 else np.zeros((n, 2))
    readout = stage.normal(0.0, 1.0, size=(n, 2)) * c.stage_readout_error_px
    defocus = c.defocus_um + np.random.default_rng([c.seed, 2]).normal(0.0, 1.0, size=n) * c.defocus_sd_um
    half = c.tile_size / 2.0
    cos, sin = math.cos(c.stage_rotation_rad), math.sin(c.stage_rotation_rad)
    tiles = []
    for i in range(n):
        row, col = c.raster_position(i)
        nx, ny = c.nominal_px(i)
        x, y = nx + float(jitter[i, 0]), ny + float(jitter[i, 1])
        faults = sorted(plan.get(i, ()))
        df = c.fault_defocus_um if "defocus" in faults else float(defocus[i])
        tile_id = str(uuid.uuid5(_NAMESPACE, f"{montage_id}/tile/{i}"))
        missing = "missing" in faults
        tiles.append(
            TileTruth(
                tile_id=tile_id,
                raster_index=i,
                row=row,
                column=col,
                nominal_px=(float(nx), float(ny)),
                position_px=(x, y),
                stage_position_nm=_on_stage(
                    x + float(readout[i, 0]) + half,
                    y + float(readout[i, 1]) + half,
                    cos,
                    sin,
                    c.pixel_size_nm,
                ),
                defocus_um=df,
                blur_sigma_px=blur_sigma_px(c, df),
                faults=faults,
                path=None if missing else str(out / f"{tile_id}.tiff"),
                acquired=not missing,
                readable=not missing and "corrupt" not in faults,
            )
        )
    return tiles


def _on_stage(x: float, y: float, cos: float, sin: float, pixel_size_nm: float) -> tuple[int, int]:
    """A plane position (px) as the stage reads it (nm): rotated by the stage rotation, scaled, rounded."""
    return round((cos * x - sin * y) * pixel_size_nm), round((sin * x + cos * y) * pixel_size_nm)


def _take_tile(camera: Camera, c: ScopeConfig, t: TileTruth) -> np.ndarray:
    rng = np.random.default_rng([c.seed, 3, t.raster_index])
    if "blank" in t.faults:
        return camera.blank(rng)
    if "no_section" in t.faults:
        return camera.film(rng)
    exposure = c.saturation_factor if "saturated" in t.faults else 1.0
    x, y = t.position_px
    return camera.tile(x, y, t.defocus_um, rng, exposure=exposure)


def _aperture_centroid(c: ScopeConfig) -> tuple[int, int]:
    """Centre of the montage (nominal) in stage nm: the imaged aperture's centroid."""
    w = (c.columns - 1) * c.step_px + c.tile_size
    h = (c.rows - 1) * c.step_px + c.tile_size
    return (
        round((c.origin_px[0] + w / 2.0) * c.pixel_size_nm),
        round((c.origin_px[1] + h / 2.0) * c.pixel_size_nm),
    )


# -- files ----------------------------------------------------------------------------------------------


def _tiff_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="minisblack", metadata=None)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
