"""``em-platform scope-sim``: acquire a simulated montage (the embedded default microscope).

The command's wiring supplies ``emit(topic, payload)`` (the acquisition journal, or a STOMP broker);
this module only parses options and runs :func:`em_platform.simulation.scope.simulate_montage`.
Tiles go to ``--out DIR/<montage_id>/``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from em_platform.simulation.scope_config import FAULT_KINDS, ScopeConfig

if TYPE_CHECKING:
    from em_platform.simulation.scope import Emit, QCStatus
    from em_platform.simulation.verdicts import VerdictWatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ScopeConfig()
    g = parser.add_argument_group("montage")
    g.add_argument("--rows", type=int, default=d.rows, help=f"tile rows (default {d.rows})")
    g.add_argument("--columns", type=int, default=d.columns, help=f"tile columns (default {d.columns})")
    g.add_argument(
        "--tile-size",
        type=int,
        default=d.tile_size,
        help=f"camera frame in px, square (default {d.tile_size}; 5000 = Allen T1)",
    )
    g.add_argument(
        "--overlap",
        type=float,
        default=d.overlap,
        help=f"overlap of neighbours, fraction of a tile (default {d.overlap})",
    )
    g.add_argument(
        "--jitter",
        type=float,
        default=d.jitter_px,
        help=f"stage jitter, ±px per axis (default {d.jitter_px:g})",
    )
    g.add_argument("--serpentine", action="store_true", help="acquire odd rows right to left")
    g.add_argument(
        "--rate",
        type=float,
        default=d.rate,
        help="acquisition rate in tiles/s (default 0 = as fast as possible)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed of stage, defocus, noise and specimen (default {d.seed})",
    )
    g.add_argument(
        "--specimen-seed", type=int, default=None, help="image another piece of tissue (default: --seed)"
    )
    g.add_argument(
        "--brightfield-frames",
        type=int,
        default=d.brightfield_frames,
        help=f"brightfield reference frames, taken with the stage moving (default {d.brightfield_frames})",
    )
    g.add_argument(
        "--darkfield-frames",
        type=int,
        default=d.darkfield_frames,
        help=f"darkfield reference frames, taken with the beam blanked (default {d.darkfield_frames})",
    )
    g.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"inject a fault, repeatable: KIND:N, KIND:N-M or KIND:rRcC with KIND in {', '.join(FAULT_KINDS)} "
        "(e.g. blank:5, saturated:7, defocus:10-13, missing:3, corrupt:8)",
    )
    g.add_argument("--out", type=Path, default=None, metavar="DIR", help="tiles go to DIR/<montage_id>/")
    g.add_argument(
        "--share-as",
        type=Path,
        default=None,
        metavar="DIR",
        help="the folder the platform sees --out as (a share mounted elsewhere there, e.g. /data/scope in the "
        "containers): tile.raw messages name the tiles under it (default: --out itself)",
    )
    g.add_argument(
        "--verdict-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="with --broker: how long to wait for the platform's qc.tile verdicts (after the first tile, and "
        "after the last verdict at the end); silence stops the montage and exits 3 (default 120)",
    )
    g.add_argument("--montage-id", default=None, help="montage id (default: a new uuid4)")


def config_from_args(args: argparse.Namespace) -> ScopeConfig:
    return ScopeConfig(
        rows=args.rows,
        columns=args.columns,
        tile_size=args.tile_size,
        overlap=args.overlap,
        jitter_px=args.jitter,
        serpentine=args.serpentine,
        rate=args.rate,
        seed=args.seed,
        specimen_seed=args.specimen_seed,
        brightfield_frames=args.brightfield_frames,
        darkfield_frames=args.darkfield_frames,
        faults=tuple(args.fault),
    )


def announced_under(emit: Emit, out: Path, share_as: Path) -> Emit:
    """``emit`` with each ``tile.raw`` path under ``out`` named under ``share_as`` instead: where the scope
    writes a share and where the platform mounts it differ."""
    out = out.resolve()

    def announce(topic: str, payload: dict) -> None:
        path = payload.get("path") if topic == "tile.raw" else None
        if path and Path(path).resolve().is_relative_to(out):
            payload = {**payload, "path": str(share_as / Path(path).resolve().relative_to(out))}
        emit(topic, payload)

    return announce


def run(
    args: argparse.Namespace,
    emit: Emit,
    qc_status: QCStatus | None = None,
    verdicts: VerdictWatch | None = None,
    listeners: str = "",
) -> int:
    """Simulate one montage; 0 on success, 2 on a configuration error, 3 when ``verdicts`` (the broker's
    ``qc.tile`` replies) says nobody judged some tiles. ``qc_status``: see simulate_montage; ``listeners``
    says where the platform should have been listening (broker, topics), for that error."""
    if args.out is None:
        print("scope-sim: choose where the tiles go with --out DIR", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(
            e["msg"].removeprefix("Value error, ")
            + (f" ({'.'.join(map(str, e['loc']))})" if e["loc"] else "")
            for e in exc.errors()
        )
        print(f"scope-sim: invalid configuration: {problems}", file=sys.stderr)
        return 2
    montage_id = args.montage_id or str(uuid.uuid4())
    out_dir = Path(args.out) / montage_id
    began = time.monotonic()
    if verdicts is not None:
        emit, qc_status = verdicts.emit(emit), verdicts.qc_status(qc_status)
    if getattr(args, "share_as", None) is not None:
        emit = announced_under(emit, Path(args.out), Path(args.share_as))
    # imported here, not on top: TEM_comms (pigeon) takes 1.4 s to import, which every `em-platform` command paid
    from em_platform.simulation.scope import simulate_montage

    try:
        truth = simulate_montage(config, out_dir, emit, montage_id=montage_id, qc_status=qc_status)
    except FileExistsError as exc:
        print(f"scope-sim: {exc}", file=sys.stderr)
        return 2
    unjudged = verdicts.wait() if verdicts is not None else []
    seconds = time.monotonic() - began
    acquired = sum(t.acquired for t in truth.tiles)
    faults = ", ".join(config.faults) or "none"
    print(
        f"scope-sim: montage {montage_id}: {acquired}/{config.total_tiles} tiles of {config.tile_size}² px "
        f"+ {len(truth.references)} reference frames in {seconds:.1f} s ({acquired / max(seconds, 1e-9):.1f} tiles/s); "
        f"faults: {faults}; files and ground_truth.json in {out_dir.resolve()}"
        + (
            f"; {len(verdicts.judged)}/{len(verdicts.sent)} judged by the platform (qc.tile)"
            if verdicts
            else ""
        )
    )
    if unjudged:
        assert verdicts is not None  # only a verdict watch leaves tiles unjudged
        nobody = len(unjudged) == len(verdicts.sent)
        print(
            f"scope-sim: {'no tile' if nobody else f'{len(unjudged)} of {len(verdicts.sent)} tiles'} of montage "
            f"{montage_id} got a qc.tile verdict within {verdicts.timeout:g} s"
            + ("" if nobody else f" (first: {', '.join(unjudged[:3])})")
            + f": {'nothing received' if nobody else 'the platform lost'} what was published {listeners}. "
            "Check that `em-platform listen` runs against this broker with the same topic prefix "
            "(EM_BROKER_TOPIC_PREFIX) and that the platform's montage sensor is on; the tiles stay in "
            f"{out_dir.resolve()}",
            file=sys.stderr,
        )
        return 3
    return 0
