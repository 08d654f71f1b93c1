"""The ``em-platform`` command."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="em-platform", description="em_platform: EM facility data on Dagster"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="write samples to the inbox, ingest them through Dagster, print the catalog")
    samples = sub.add_parser("samples", help="write the sample volumes into a folder (default: the inbox)")
    samples.add_argument("folder", nargs="?", type=Path)
    sub.add_parser("settings", help="print the effective settings (from EM_* variables)")
    from em_platform.tem import listen_cli

    listen_cli.add_arguments(
        sub.add_parser("listen", help="journal the microscope's STOMP messages (tile.raw, montage.*)")
    )
    from em_platform.simulation import scope_cli

    sim = sub.add_parser(
        "scope-sim", help="simulate a microscope acquiring a montage (the embedded default scope)"
    )
    scope_cli.add_arguments(sim)
    sim.add_argument(
        "--broker",
        metavar="HOST:PORT",
        default=None,
        help="publish to this STOMP broker instead of writing the journal (default: $EM_BROKER if set)",
    )
    stitch = sub.add_parser(
        "stitch",
        help="stitch a folder of TIFF tiles laid out by a CSV into a fused OME-Zarr montage",
        description="Match every tile against its top and left grid neighbours, solve the positions, "
        "write OUT.positions.csv (tile,x,y: solved top-left corners in px, the layout's frame) and fuse "
        "the montage into a multiscale OME-Zarr at OUT.",
    )
    stitch.add_argument("tiles_dir", type=Path, metavar="TILES_DIR", help="folder of 2-D TIFF tiles")
    stitch.add_argument(
        "--layout",
        type=Path,
        required=True,
        metavar="LAYOUT.csv",
        help="CSV with the header tile,row,column,x,y: file name, grid indices, nominal top-left in px",
    )
    stitch.add_argument("--out", type=Path, required=True, metavar="OUT.zarr", help="the fused OME-Zarr")
    stitch.add_argument(
        "--pixel-size-nm",
        type=float,
        default=None,
        help="pixel size recorded in the OME-Zarr (default: from the TIFFs' resolution tags, else 1 nm)",
    )
    stitch.add_argument(
        "--workers", type=int, default=None, help="threads for matching and fusion (default: one per core)"
    )
    stitch.add_argument(
        "--max-shift-px",
        type=int,
        default=None,
        help="how far (px) a tile may be from where the layout puts it relative to a neighbour "
        "(default: a third of the overlap, at most 64)",
    )
    args = parser.parse_args(argv)

    from em_platform.settings import ConfigError, load_settings

    try:
        if args.command == "demo":
            from em_platform.demo import run_demo

            return run_demo()
        if args.command == "samples":
            from em_platform.samples import write_samples

            folder = args.folder or Path(load_settings().inbox)
            for p in write_samples(folder):
                print(p)
            return 0
        if args.command == "listen":
            from em_platform.tem.journal import Journal

            return listen_cli.run(args, lambda: Journal(load_settings().catalog_url))
        if args.command == "scope-sim":
            return _scope_sim(args, load_settings())
        if args.command == "stitch":
            return _stitch(args)
        if args.command == "settings":
            for k, v in vars(load_settings()).items():
                print(f"{k} = {v}")
            return 0
    except ConfigError as exc:
        print(f"em-platform: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


def _scope_sim(args, settings) -> int:
    """Run the simulated scope, its messages going to the broker or straight into the journal."""
    from em_platform.simulation import scope_cli

    if args.out is None:
        if "://" in settings.data_root:
            print(
                "em-platform scope-sim: give --out DIR (tiles are files the processing must read)",
                file=sys.stderr,
            )
            return 2
        args.out = Path(settings.data_root) / "scope"
    broker = args.broker or settings.broker
    if broker:
        from em_platform.tem.protocol import BrokerPublisher, parse_broker

        heard: list[tuple[str, str | None]] = []  # the qc.status verdicts, newest last
        with BrokerPublisher(*parse_broker(broker)) as publisher:
            publisher.subscribe("qc.status", lambda msg: heard.append((msg.status, msg.reason)))
            return scope_cli.run(args, publisher.publish, lambda: heard[-1] if heard else None)
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url)
    montage_id = args.montage_id = args.montage_id or str(uuid.uuid4())

    def latest_qc():
        statuses = journal.qc_statuses(montage_id)
        return statuses[-1] if statuses else None

    try:
        return scope_cli.run(args, journal.record, latest_qc)
    finally:
        journal.dispose()


def _stitch(args) -> int:
    """Stitch a tile folder: match neighbours, solve, write the positions, fuse; 2 on bad input."""
    import shutil
    import uuid

    import dask

    from em_platform.stitch.fuse import PlacedTile, TiffTileFolder, fuse_montage
    from em_platform.stitch.tile_folder import (
        TileFolderError,
        match_tile_folder,
        open_tile_folder,
        positions_path,
        solve_tile_folder,
        write_positions,
    )
    from em_platform.storage.store import DataStore

    def bad_input(message: object) -> int:
        print(f"em-platform stitch: {message}", file=sys.stderr)
        return 2

    if args.pixel_size_nm is not None and not args.pixel_size_nm > 0:
        return bad_input(f"--pixel-size-nm must be positive, got {args.pixel_size_nm}")
    if args.workers is not None and args.workers < 1:
        return bad_input(f"--workers must be at least 1, got {args.workers}")
    if args.max_shift_px is not None and args.max_shift_px < 1:
        return bad_input(f"--max-shift-px must be at least 1, got {args.max_shift_px}")
    try:
        tiles = open_tile_folder(args.tiles_dir, args.layout)
        report = match_tile_folder(tiles, workers=args.workers, max_shift_px=args.max_shift_px)
    except TileFolderError as exc:
        return bad_input(exc)
    layout = solve_tile_folder(tiles, report)

    if args.pixel_size_nm is not None:
        pixel_size, source = args.pixel_size_nm, "--pixel-size-nm"
    elif tiles.pixel_size_nm is not None:
        pixel_size, source = tiles.pixel_size_nm, "the TIFF resolution tags"
    else:
        pixel_size, source = 1.0, "unknown (no resolution tags): 1 nm recorded, give --pixel-size-nm"
    placed = [
        PlacedTile(t.tile, layout.positions[t.tile][1], layout.positions[t.tile][0], t.height, t.width)
        for t in tiles.tiles
    ]
    # fused beside OUT under a temporary name and renamed into place: a failed run leaves no OUT
    out = args.out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with dask.config.set(num_workers=args.workers):
            fused = fuse_montage(
                placed,
                TiffTileFolder(tiles.folder),
                str(staging),
                pixel_size_nm=pixel_size,
                name=out.name.removesuffix(".zarr").removesuffix(".ome"),
            )
        DataStore(str(out.parent)).publish(str(staging), str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    positions = write_positions(positions_path(out), layout.positions)

    residuals = list(layout.edge_residuals.values())
    print(f"tiles:         {len(tiles.tiles)} ({tiles.dtype}, layout {tiles.layout_csv})")
    print(f"edges matched: {len(report.edges)} of {report.pairs} neighbour pairs")
    for pair, reason in report.unmatched[:10]:
        print(f"  unmatched:   {pair.tile.tile} – {pair.position} neighbour {pair.neighbour.tile}: {reason}")
    if len(report.unmatched) > 10:
        print(f"  … and {len(report.unmatched) - 10} more unmatched pairs")
    rejected = [f"{a}–{b} ({r:.1f} px)" for (a, b), r in layout.rejected.items()]
    print(f"rejected:      {len(rejected)}", *rejected[:10])
    disconnected = [str(t) for t in layout.disconnected]
    print(
        f"disconnected:  {len(disconnected)}",
        *(["(placed by the layout):", *disconnected[:10]] if disconnected else []),
    )
    print(f"RMS residual:  {layout.rms_residual():.3f} px (max {max(residuals, default=0.0):.3f} px)")
    print(f"pixel size:    {pixel_size:g} nm ({source})")
    print(
        f"fused:         {out} ({fused.shape[0]} × {fused.shape[1]} px, {len(fused.info.levels)} levels; "
        f"pixel (0, 0) is at x={fused.origin[1]}, y={fused.origin[0]} of the positions)"
    )
    print(f"positions:     {positions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
