"""``em-platform stitch``: a folder of TIFF tiles and a layout CSV in, a stitched montage and its report out.

Outputs beside ``OUT.zarr`` (the fused multiscale OME-Zarr; ``--no-fuse`` leaves it out):

* ``OUT.positions.csv``: ``tile,x,y``, where each tile's pixel (0, 0) lands (the layout's frame, px);
* ``OUT.report.json``: tiles placed, blank, skipped and *unplaced* by name, components, edges, residuals
  per point pair, seams, checks (:mod:`em_platform.stitch.stitch_report`);
* ``OUT.tilespecs.json``: render tile specs (lens correction + AffineModel2D per tile) for render/BigFeta;
* ``OUT.matches.json``: the point matches used, as render point-match JSON (em_stitch/BigFeta read it).

Exit status: 0 when every check passes; 3 when content tiles could not be placed by the images, the
montage is torn or a seam shows (everything is still written, and the report says which; give
``--allow-unplaced`` to exit 0 with the warning); 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # the fusion (dask) for the type checker; at run time the commands import it on first use
    from em_platform.stitch.fuse import Rows2x3

__all__ = ["add_arguments", "run"]


def add_arguments(stitch: argparse.ArgumentParser) -> None:
    stitch.add_argument("tiles_dir", type=Path, metavar="TILES_DIR", help="folder of 2-D TIFF tiles")
    where = stitch.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--layout",
        type=Path,
        metavar="LAYOUT.csv",
        help="CSV with the header tile,row,column,x,y: file name, grid indices, top-left in px (the stage's)",
    )
    where.add_argument(
        "--metafile",
        type=Path,
        metavar="_metadata_*.json",
        help="a TEMCA montage metafile instead: tiles, stage positions and the scope's own matches (used "
        "unless --matches is given); without the tiles' TIFFs in TILES_DIR it solves and reports only",
    )
    stitch.add_argument("--out", type=Path, required=True, metavar="OUT.zarr", help="the fused OME-Zarr")
    stitch.add_argument(
        "--model",
        choices=("auto", "translation", "rigid", "affine", "polynomial"),
        default="auto",
        help="transform per tile: auto (default) takes translation, rigid or affine, each step up only when "
        "the matches pay for its parameters (the report's model_choice says why); rigid adds a rotation, "
        "affine scale and shear, polynomial a 2nd-order bend (solved and reported, written as render "
        "PolynomialTransform2D tile specs, not fused: give --no-fuse)",
    )
    stitch.add_argument(
        "--stage-error-px",
        type=float,
        default=None,
        help="how far (px) a tile's layout position may be from where it is, per axis (default: half "
        "the overlap); the fine search window and the coarse fallback follow from it",
    )
    stitch.add_argument(
        "--max-shift-px",
        type=int,
        default=None,
        help="fix the fine search window (px) instead of deriving it from --stage-error-px",
    )
    stitch.add_argument(
        "--matches",
        type=Path,
        default=None,
        metavar="FILE",
        help="use these point matches (render/em_stitch point-match JSON; pId/qId = tile file names or "
        "their stems) instead of matching the images",
    )
    stitch.add_argument(
        "--lens", type=Path, default=None, metavar="LENS.json", help="apply this lens correction"
    )
    stitch.add_argument(
        "--estimate-lens",
        type=Path,
        default=None,
        metavar="LENS.json",
        help="estimate the scope's lens correction from this montage's overlaps and write it here",
    )
    stitch.add_argument(
        "--z",
        type=float,
        default=0.0,
        help="the section's z in the render tile specs and the point matches' groupId (default 0)",
    )
    stitch.add_argument(
        "--lens-order",
        default="auto",
        metavar="N|auto",
        help="with --estimate-lens: the lens polynomial's highest degree, or auto (default): the degree of "
        "2-5 with the lowest residual on point pairs the fit did not see",
    )
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
        "--no-fuse",
        action="store_true",
        help="solve and report only; write no OUT.zarr and measure no seams on pixels (a 5,000-tile montage "
        "solves in a minute from its matches)",
    )
    stitch.add_argument(
        "--seams", action="store_true", help="with --no-fuse: still measure the seams on the tiles' pixels"
    )
    stitch.add_argument(
        "--allow-unplaced",
        action="store_true",
        help="exit 0 even when content tiles could not be placed or the montage is torn (still reported)",
    )


def _bad_input(message: object) -> int:
    print(f"em-platform stitch: {message}", file=sys.stderr)
    return 2


def _check_options(args) -> str | None:
    from em_platform.stitch.lens import parse_lens_order

    if args.pixel_size_nm is not None and not args.pixel_size_nm > 0:
        return f"--pixel-size-nm must be positive, got {args.pixel_size_nm}"
    if args.workers is not None and args.workers < 1:
        return f"--workers must be at least 1, got {args.workers}"
    if args.max_shift_px is not None and args.max_shift_px < 1:
        return f"--max-shift-px must be at least 1, got {args.max_shift_px}"
    if args.stage_error_px is not None and not args.stage_error_px >= 0:
        return f"--stage-error-px must be 0 or more, got {args.stage_error_px}"
    try:
        parse_lens_order(args.lens_order)
    except ValueError:
        return f"--lens-order must be auto or a degree from 2 to 8, got {args.lens_order!r}"
    if args.model == "polynomial" and not args.no_fuse:
        return "--model polynomial is solved and reported but not fused (fusion draws affine tiles): add --no-fuse"
    return None


def run(args) -> int:
    """Stitch a tile folder: match (or read matches), solve, report, fuse; see the module docstring."""
    from em_platform.stitch.interop import MatchFileError, read_point_matches, tilespecs, write_point_matches
    from em_platform.stitch.lens import LensModel, estimate_lens, parse_lens_order
    from em_platform.stitch.temca import TemcaFileError
    from em_platform.stitch.tile_folder import (
        TileFolderError,
        match_tile_folder,
        open_tile_folder,
        positions_path,
        solve_tile_folder,
        write_positions,
    )

    problem = _check_options(args)
    if problem:
        return _bad_input(problem)
    lens_order = parse_lens_order(args.lens_order)
    try:
        metafile = None
        if args.metafile is not None:
            tiles, metafile = _metafile_tiles(args.tiles_dir, args.metafile)
        else:
            tiles = open_tile_folder(args.tiles_dir, args.layout)
        lens = None
        if args.lens is not None:
            try:
                lens = LensModel.from_dict(json.loads(Path(args.lens).read_text()))
            except (OSError, ValueError, KeyError) as exc:
                return _bad_input(f"{args.lens}: not a lens correction this command wrote ({exc})")
        report = None
        if args.matches is None and metafile is not None:
            point_edges = list(metafile.edges)
            if not point_edges:
                return _bad_input(f"{args.metafile}: its matcher holds no point pairs; give --matches")
        elif args.matches is not None:
            names = {Path(t.tile).stem: t.tile for t in tiles.tiles}
            known = {t.tile for t in tiles.tiles}
            point_edges = [
                e for e in read_point_matches(args.matches, names) if e.tile in known and e.neighbour in known
            ]
            if not point_edges:
                return _bad_input(f"{args.matches}: no point match names two tiles of {args.layout}")
        elif metafile is None:
            report = match_tile_folder(
                tiles,
                workers=args.workers,
                max_shift_px=args.max_shift_px,
                stage_error_px=args.stage_error_px,
            )
            point_edges = report.point_edges
        layout = solve_tile_folder(tiles, report, args.model, lens=lens, point_edges=point_edges)
    except (TileFolderError, MatchFileError, TemcaFileError) as exc:
        return _bad_input(exc)

    out = args.out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name.removesuffix(".zarr").removesuffix(".ome")
    fitted = None
    if args.estimate_lens is not None:
        w, h = tiles.tiles[0].width, tiles.tiles[0].height
        fitted = estimate_lens(point_edges, (w, h), order=lens_order)
        args.estimate_lens.write_text(
            json.dumps({**fitted.model.to_dict(), "fit": fitted.summary()}, indent=1)
        )

    pixel_size, source = _pixel_size(args, tiles)
    images = all((tiles.folder / t.tile).is_file() for t in tiles.tiles)
    if not images:
        print(
            f"note: the tiles' TIFFs are not all in {tiles.folder}: solved from the matches only "
            "(no fused image, no seams measured on pixels)",
            file=sys.stderr,
        )
    fused = None if args.no_fuse or not images else _fuse(args, tiles, layout, lens, pixel_size, out)
    # the seam pass reads and resamples every overlap: with the fused montage, or when asked for
    measure = images and layout.polynomials is None and (not args.no_fuse or args.seams)
    seams = _seams(tiles, layout, report, point_edges, lens) if measure else None
    doc = _report(args, tiles, report, layout, seams, lens, fitted)
    shapes = {t.tile: (t.height, t.width) for t in tiles.tiles}
    tile_ids = {t.tile: Path(t.tile).stem for t in tiles.tiles}
    _write_json(out.with_name(f"{stem}.report.json"), doc)
    _write_json(
        out.with_name(f"{stem}.tilespecs.json"),
        tilespecs(
            layout.transforms,
            shapes,
            image_dir=tiles.folder,
            lens=lens,
            z=args.z,
            polynomials=layout.polynomials,
            tile_ids=tile_ids,
        ),
    )
    # render's ids for the tiles (em_stitch's pId/qId: the file name without its extension), one section z
    write_point_matches(
        out.with_name(f"{stem}.matches.json"), point_edges, group=f"{float(args.z)}", tile_ids=tile_ids
    )
    positions = write_positions(positions_path(out), layout.positions)
    _print_summary(tiles, report, layout, doc, pixel_size, source, fused, out, positions, args)
    if doc["passed"]:
        return 0
    failed = [k for k, ok in doc["checks"].items() if not ok]
    print(
        f"WARNING: checks failed: {', '.join(failed)}; {len(doc['tiles']['unplaced'])} content tile(s) "
        f"placed by the stage only; see {out.with_name(f'{stem}.report.json')}",
        file=sys.stderr,
    )
    return 0 if args.allow_unplaced else 3


def _metafile_tiles(folder: Path, metafile_path: Path):
    """A TEMCA metafile as the tile folder the rest of the command works on (no TIFF is opened)."""
    import numpy as np

    from em_platform.stitch.temca import read_temca_metafile
    from em_platform.stitch.tile_folder import FolderTile, TileFolder

    montage = read_temca_metafile(metafile_path)
    tiles = tuple(
        FolderTile(t.name, t.row, t.column, t.x, t.y, montage.height, montage.width, i)
        for i, t in enumerate(montage.tiles)
    )
    folder = Path(folder)
    return TileFolder(
        folder, Path(metafile_path), tiles, np.dtype(montage.dtype), montage.pixel_size_nm
    ), montage


def _pixel_size(args, tiles) -> tuple[float, str]:
    if args.pixel_size_nm is not None:
        return args.pixel_size_nm, "--pixel-size-nm"
    if tiles.pixel_size_nm is not None:
        return tiles.pixel_size_nm, "the metafile" if args.metafile else "the TIFF resolution tags"
    return 1.0, "unknown (no resolution tags): 1 nm recorded, give --pixel-size-nm"


def _fuse(args, tiles, layout, lens, pixel_size, out):
    """Fuse beside OUT under a temporary name and rename it into place: a failed run leaves no OUT."""
    import shutil

    import dask

    from em_platform.stitch.fuse import PlacedTile, TiffTileFolder, fuse_montage
    from em_platform.storage.store import DataStore

    placed = []
    for t in tiles.tiles:
        m = layout.transforms[t.tile]
        placed.append(
            PlacedTile(
                t.tile,
                float(m[1, 2]),
                float(m[0, 2]),
                t.height,
                t.width,
                cast("Rows2x3", tuple(map(tuple, m.tolist()))),  # 2×3: TransformLayout.transforms
            )
        )
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with dask.config.set(num_workers=args.workers):
            fused = fuse_montage(
                placed,
                TiffTileFolder(tiles.folder),
                str(staging),
                pixel_size_nm=pixel_size,
                name=out.name.removesuffix(".zarr").removesuffix(".ome"),
                lens=lens,
            )
        DataStore(str(out.parent)).publish(str(staging), str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fused


def _seams(tiles, layout, report, point_edges, lens):
    """Seams of the accepted edges between content tiles, on the pixels as fused."""
    import functools

    import tifffile

    from em_platform.stitch.seams import measure_seams

    blank = set(report.blank) if report is not None else set()
    pairs = [(a, b) for a, b in layout.edge_residuals if a not in blank and b not in blank]
    pairs += [(a, b) for a, b in layout.rejected if a not in blank and b not in blank]

    @functools.lru_cache(maxsize=64)
    def read(name):
        return tifffile.imread(tiles.folder / name)

    shapes = {t.tile: (t.height, t.width) for t in tiles.tiles}
    return measure_seams(
        sorted(pairs, key=lambda p: (str(p[0]), str(p[1]))), layout.transforms, read, shapes, lens=lens
    )


def _report(args, tiles, report, layout, seams, lens, fitted):
    from em_platform.stitch.stitch_report import stitch_report

    cells = {t.tile: (t.row, t.column) for t in tiles.tiles}
    unmatched = (
        [(p.tile.tile, p.neighbour.tile, p.position, why) for p, why in report.unmatched] if report else []
    )
    extra = {
        "layout": str(args.layout or args.metafile),
        "lens": None
        if lens is None
        else {"file": str(args.lens), "max_displacement_px": lens.max_displacement()},
    }
    if layout.loops:
        extra["loops"] = layout.loops
    if fitted is not None:
        extra["lens_estimate"] = {"file": str(args.estimate_lens), **fitted.summary()}
    return stitch_report(
        cells=cells,
        skipped=tiles.skipped,
        blank=report.blank if report else (),
        layout=layout,
        methods=report.methods() if report else {"external": len(layout.edge_residuals)},
        unmatched=unmatched,
        seams=seams,
        source="images" if report else f"matches {args.matches or args.metafile}",
        extra=extra,
    )


def _write_json(path: Path, doc) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def _print_summary(tiles, report, layout, doc, pixel_size, source, fused, out, positions, args) -> None:
    print(f"tiles:         {len(tiles.tiles)} ({tiles.dtype}, layout {tiles.layout_csv})")
    for s in tiles.skipped[:10]:
        print(f"  skipped:     {s.tile} (line {s.line}): {s.reason}")
    if report is not None:
        methods = ", ".join(f"{n} {k}" for k, n in sorted(report.methods().items()))
        print(f"edges matched: {len(report.matches)} of {report.pairs} neighbour pairs ({methods or 'none'})")
        for pair, reason in report.unmatched[:10]:
            print(
                f"  unmatched:   {pair.tile.tile} – {pair.position} neighbour {pair.neighbour.tile}: {reason}"
            )
        if len(report.unmatched) > 10:
            print(f"  … and {len(report.unmatched) - 10} more unmatched pairs")
        print(f"blank:         {len(report.blank)}", *report.blank[:10])
    else:
        print(
            f"edges:         {len(layout.edge_residuals) + len(layout.rejected)} from "
            f"{args.matches or args.metafile}"
        )
    loops = layout.loops
    if loops.get("loops"):
        print(
            f"loops:         {loops['loops_closing']} of {loops['loops']} close within "
            f"{loops['loop_tolerance_px']} px; {loops['edges_refused_by_loops']} edge(s) refused by them"
        )
    rejected = [f"{a}–{b} ({r:.1f} px)" for (a, b), r in layout.rejected.items()]
    print(f"rejected:      {len(rejected)}", *rejected[:10])
    unplaced = doc["tiles"]["unplaced"]
    print(
        f"unplaced:      {len(unplaced)}",
        *(["(placed by the layout only):", *unplaced[:10]] if unplaced else []),
    )
    stats = layout.residual_stats
    residuals = list(layout.edge_residuals.values())
    print(
        f"RMS residual:  {layout.rms_residual():.3f} px (max {max(residuals, default=0.0):.3f} px); per point "
        f"pair {stats.get('mean_px', 0.0):.3f} ± {stats.get('std_px', 0.0):.3f} px ({layout.model})"
    )
    seams = doc["seams"] or {}
    if seams.get("measured"):
        print(
            f"seams:         max {seams.get('max_px')} px over {seams.get('measured')} overlaps in the fused "
            "pixels"
        )
    else:
        print("seams:         not measured (no tile pixels)")
    print(f"pixel size:    {pixel_size:g} nm ({source})")
    if fused is not None:
        print(
            f"fused:         {out} ({fused.shape[0]} × {fused.shape[1]} px, {len(fused.info.levels)} levels; "
            f"pixel (0, 0) is at x={fused.origin[1]}, y={fused.origin[0]} of the positions)"
        )
    print(f"positions:     {positions}")
