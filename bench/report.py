"""docs/benchmarks.md from bench/results/*.json: the headline figures of every benchmark, each with the file
and field it comes from, so the page cannot drift from what the benchmarks recorded (a test regenerates it
and compares).

python -m bench.report            # rewrite docs/benchmarks.md
python -m bench.report --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

# (results file, section, [(what, JSON path with * for "every item", unit)]): a path over several values
# is shown as their range.
FIGURES: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    (
        "scale.json",
        "A facility's year: 10³ to 10⁵ montages, and after the retention job (`bench_scale`, `make bench-scale`)",
        [
            (f"{what} at {label}", f"latest.{point}.{field}", unit)
            for what, field, unit in (
                ("an asset's partitions page (its slowest query)", "page_asset_partitions", "s"),
                ("one partition's page", "page_asset_partition", "s"),
                ("the global lineage", "page_global_lineage", "s"),
                ("the runs list", "page_runs", "s"),
                ("the webserver with its code server", "webserver_mb", "MB"),
            )
            for point, label in (
                ("1000_filled", "10³"),
                ("100000_filled", "10⁵"),
                ("100000_after_retention", "10⁵ after retention"),
            )
        ]
        + [
            ("the montage sensor's tick (one new montage)", "latest.*.tick_montage_sensor", "s"),
            ("the inbox, cryo and simulation sensors' ticks", "latest.*.tick_inbox_sensor", "s"),
            (
                "`em-platform backfill` of 1,000 partitions",
                "latest.*.backfill_em_platform_1000_partitions?",
                "s",
            ),
            ("TEMdb's tiles of one montage", "latest.*.query_montage_tiles", "s"),
            (
                "`dagster job backfill` of 1,000 partitions",
                "latest.*.backfill_dagster_job_1000_partitions?",
                "s",
            ),
            ("every catalog record, as the catalog asset reads them", "latest.*.run_all_records", "s"),
            (
                "`storage_consistency` choosing the day's share of records",
                "latest.*.run_storage_audit_due",
                "s",
            ),
        ],
    ),
    (
        "live_qc.json",
        "Live QC: two scopes at 3.07 tiles/s of 5000² uint8 each (`bench_tiles_live`)",
        [
            (
                "warm live-QC service: tile.raw → qc.tile p95",
                "live_service.runs.*.scopes.*.latency_s_p95",
                "s",
            ),
            ("warm live-QC service: max", "live_service.runs.*.scopes.*.latency_s_max", "s"),
            (
                "with a 1 GiB ingest and a fusion beside it (the pool as deployed): p95",
                "live_service_with_batch.runs_own_batch_niced_pool.*.scopes.*.latency_s_p95",
                "s",
            ),
            (
                "with the batch work: max",
                "live_service_with_batch.runs_own_batch_niced_pool.*.scopes.*.latency_s_max",
                "s",
            ),
            (
                "with the batch work: p95 over the p95 alone (worst scopes, one invocation; at most 1.5)",
                "live_service_with_batch.p95_over_alone_own_batch_niced_pool",
                "×",
            ),
            (
                "the batch work meanwhile: ingest of 1 GiB",
                "live_service_with_batch.runs_own_batch_niced_pool.*.batch.ingest_1gib_s",
                "s",
            ),
            (
                "the batch work alone: ingest of 1 GiB",
                "live_service_with_batch.batch_alone.ingest_1gib_s",
                "s",
            ),
            ("a run per montage, no service: p95", "scopes.*.latency_s_p95", "s"),
            ("re-processing a finished montage", "unpaced.tiles_per_s", "tiles/s"),
            ("CPU per tile", "unpaced.cpu_ms_per_tile", "ms"),
            (
                "every run on record (`history`, older code too): CPU per tile",
                "history.*.unpaced_cpu_ms_per_tile",
                "ms",
            ),
        ],
    ),
    (
        "tiles.json",
        "The per-tile chain (`bench_tiles`)",
        [
            ("tiles of 5000² through the chain, 2 cores", "em_platform.tiles_per_s", "tiles/s"),
            ("against a naive implementation", "speedup_vs_naive", "×"),
        ],
    ),
    (
        "montage.json",
        "Stitching (`bench_montage`, `bench_temca`)",
        [
            ("10 × 10 synthetic montage: error from the truth", "em_platform.rms_error_px", "px"),
            ("ASHLAR's time over ours on it", "comparison.ashlar_time_over_ours", "×"),
            (
                "real 4,969-tile TEMCA montage, affine: mean residual",
                "temca.solves.ours_affine.residual_per_kept_pair.mean_px",
                "px",
            ),
            ("em_stitch (BigFeta) affine on it", "temca.em_stitch_itself.affine.mean_px", "px"),
            (
                "polynomial: mean residual",
                "temca.solves.ours_polynomial.residual_per_kept_pair.mean_px",
                "px",
            ),
            ("em_stitch polynomial on it", "temca.em_stitch_itself.polynomial.mean_px", "px"),
            (
                "affine: worst pair em_stitch keeps",
                "temca.worst_pair.affine.ours.em_stitch_kept_pairs.max_px",
                "px",
            ),
            ("em_stitch affine: its worst pair", "temca.worst_pair.affine.em_stitch.max_px", "px"),
            (
                "polynomial: worst pair em_stitch keeps",
                "temca.worst_pair.polynomial.ours.em_stitch_kept_pairs.max_px",
                "px",
            ),
            ("em_stitch polynomial: its worst pair", "temca.worst_pair.polynomial.em_stitch.max_px", "px"),
            ("affine solve CPU", "temca.solves.ours_affine.cpu_s", "s"),
        ],
    ),
    (
        "ome_zarr.json",
        "OME-Zarr conversion of a 2 GiB volume (`bench_ome_zarr`)",
        [
            ("our writer over plain zarr (MB/s)", "ratios.em_platform/plain_zarr", "×"),
            ("our writer over ome-zarr's write_image", "ratios.em_platform/write_image", "×"),
        ],
    ),
    (
        "ingest.json",
        "Public-dataset ingest (`bench_ingest`)",
        [
            (
                "1 GiB over a 100 MB/s link: ingest (OME-Zarr pyramid included) over a plain download",
                "whole_ingest.sizes.1GiB.link.ingest_vs_plain",
                "×",
            ),
        ],
    ),
    (
        "simulation.json",
        "Cryo-ET simulation (`bench_simulation`)",
        [
            ("41 × 512² tilt series of ~650k atoms", "verdict.stack_wall_s", "s"),
            (
                "over the reference (TEM-Simulator-like) implementation",
                "verdict.speedup_vs_reference_wall",
                "×",
            ),
            ("per-particle defocus residual, max", "verdict.particle_defocus_residual_max_A", "Å"),
        ],
    ),
    (
        "cryo.json",
        "Cryo processing (`bench_cryo`)",
        [
            ("motion correction + CTF per exposure", "mc_plus_ctf_s_per_exposure", "s"),
            ("weighted back-projection over scikit-image's iradon", "wbp_speedup_vs_iradon", "×"),
            ("defocus error, median over the tilts", "accuracy.figures.defocus_error_pct_median", "%"),
            ("defocus error, worst tilt", "accuracy.figures.defocus_error_pct_max", "%"),
        ],
    ),
    (
        "motion.json",
        "Motion correction against a plain aligner, 2048² to K3 (`bench_motion`)",
        [
            ("plain aligner's time over ours, every size", "sizes.*.ratio_plain_over_ours_wall", "×"),
            ("motion correction + CTF per 4096² × 40 exposure", "mc_plus_ctf_s_per_4096_exposure", "s"),
            ("every run on record (`history`): plain over ours", "history.*.ratio_plain_over_ours_wall", "×"),
            ("every run on record: MC + CTF at 4096²", "history.*.mc_plus_ctf_s_per_exposure?", "s"),
            ("every run on record: the 1-min load average", "history.*.load_1min.max", ""),
        ],
    ),
    (
        "since.json",
        "Against the code issue 38 was filed on, taking turns in one run (`bench_since`)",
        [
            ("MC + CTF per 4096² exposure: then (the earlier commit's code)", "motion.then_median", "s"),
            ("MC + CTF per 4096² exposure: now", "motion.now_median", "s"),
            ("MC + CTF: then over now", "motion.ratio_then_over_now", "×"),
            ("issue 38's 9.6 s at that ratio", "motion.issue_38_scaled.0", "s"),
            ("live chain CPU per tile: then", "live_tiles.then_median", "ms"),
            ("live chain CPU per tile: now", "live_tiles.now_median", "ms"),
            ("live chain: then over now", "live_tiles.ratio_then_over_now", "×"),
            ("issue 38's 261–307 ms at that ratio", "live_tiles.issue_38_scaled.*", "ms"),
            ("every run on record (`history`): then over now, MC + CTF", "motion.history.*.ratio", "×"),
            ("every run on record: then over now, live chain", "live_tiles.history.*.ratio", "×"),
        ],
    ),
    (
        "deploy.json",
        "The production topology as processes (`bench_deploy`)",
        [
            (
                "inbox drop → catalog record, topology over embedded",
                "inbox_drop_to_record.topology_over_embedded",
                "×",
            ),
        ],
    ),
    (
        "faults.json",
        "Faults: SIGKILL of a service mid-ingest or mid-montage (`bench_faults`)",
        [
            ("recovery, kill → every item complete", "faults.*.recovery_s", "s"),
            ("every item exactly once", "all_exactly_once", ""),
        ],
    ),
    (
        "ctf_kernels.json",
        "CTF kernels: phase flipping a 2048² view, the fits' score (`bench_ctf_kernels`)",
        [
            ("phase flip at 60° (36 strips)", "phase_flip.tilts.60.phase_flip_s", "s"),
            ("over the whole-plane flip per strip", "phase_flip.tilts.*.speedup", "×"),
            ("the fits' score (CC with CTF²) on a fit band", "thon_rings.thon_rings_ms", "ms"),
            ("over the literal score", "thon_rings.speedup", "×"),
        ],
    ),
    (
        "dask_idle.json",
        "An idle Dask pool: scheduler + 2 workers (`bench_dask_idle`)",
        [
            ("CPU with Dask's defaults", "defaults_cpu_ms_per_s", "ms/s"),
            ("CPU with em_platform.quiet_dask's settings", "quiet_cpu_ms_per_s", "ms/s"),
            ("defaults over quiet", "defaults_over_quiet", "×"),
        ],
    ),
    (
        "viewer.json",
        "The image viewer: a montage's chunks to a browser, 6 connections (`bench_viewer`)",
        [
            ("every chunk of an 8192² montage's pyramid", "viewer_mib_per_s", "MiB/s"),
            ("its time over Python's static file server (no checks)", "viewer_time_over_static", "×"),
        ],
    ),
    (
        "slurm.json",
        "The Dask work on SLURM jobs against the local cluster: a 3 × 4 montage (`bench_slurm`)",
        [
            ("the montage job on the local cluster", "local_cluster_s", "s"),
            ("the same on SLURM worker jobs (a single-node SLURM)", "slurm_jobs_s", "s"),
            ("SLURM over local", "slurm_over_local", "×"),
            ("the first worker joins, as a SLURM job", "slurm_first_worker_s", "s"),
            ("the first worker joins, locally", "local_first_worker_s", "s"),
            ("a small task's round trip, on SLURM workers", "slurm_task_round_trip_ms", "ms"),
            ("a small task's round trip, local", "local_task_round_trip_ms", "ms"),
        ],
    ),
    (
        "cryo_live.json",
        "A live single-particle session, one exposure every 10 s (`bench_cryo_live`, `make bench-cryo-live`)",
        [
            ("movie complete to results stored, p50", "latest.lag_s.p50", "s"),
            ("p95", "latest.lag_s.p95", "s"),
            ("max (at most 60)", "latest.lag_s.max", "s"),
            ("the service's CPU per exposure", "latest.service_cpu_s_per_exposure", "s"),
            ("every run on record (`history`): its length", "history.*.duration_s", "s"),
            ("every run on record: the worst lag", "history.*.lag_s.max", "s"),
        ],
    ),
    (
        "cryo_scan.json",
        "Finding a live session's exposures as it grows (`bench_cryo_scan`)",
        [
            ("exposures in the session", "latest.points.*.exposures", ""),
            (
                "the cryo sensor's tick after one more exposure",
                "latest.points.*.seconds.sensor_tick_one_new",
                "s",
            ),
            ("the sensor's tick with nothing new", "latest.points.*.seconds.sensor_tick_nothing_new", "s"),
            ("its first tick (every mdoc read once)", "latest.points.*.seconds.sensor_tick_first", "s"),
            ("cryo-live's scan after one more exposure", "latest.points.*.seconds.watch_scan_one_new", "s"),
            ("its first scan", "latest.points.*.seconds.watch_scan_first", "s"),
        ],
    ),
    (
        "suite.json",
        "The test suites from a fresh clone, set-up included (`python -m bench.bench_suite`)",
        [
            ("make test, the latest run (at most 720)", "latest.test.seconds", "s"),
            ("its host's OpenCV CLAHE on a 5000² tile", "latest.test.opencv_clahe_5000_ms", "ms"),
            (".ci/run, the latest run (at most 3,600)", "latest.ci.seconds", "s"),
            ("every run on record (`history`), either", "history.*.seconds", "s"),
        ],
    ),
    (
        "metrics_cost.json",
        "What the metrics cost the live chain (`bench_metrics`)",
        [
            ("the chain's CPU per tile (5000², one thread)", "history.*.chain_cpu_ms_per_tile", "ms"),
            ("verdicts counted, with their latency", "history.*.metrics_cpu_ms_per_tile.verdicts", "ms"),
            (
                "a tile counted as the listener journals it",
                "history.*.metrics_cpu_ms_per_tile.tile_received",
                "ms",
            ),
            ("a scrape every 15 s, per tile of two scopes", "history.*.metrics_cpu_ms_per_tile.scrape", "ms"),
            ("all of it over the chain's (at most 0.02)", "history.*.metrics_over_chain", ""),
        ],
    ),
]


def values(data: Any, path: str) -> list[Any]:
    """The values at ``path`` (dot-separated; ``*`` takes every item of a list or mapping; a key ending in
    ``?`` is taken where it is there: history entries of one size only, say)."""
    found = [data]
    for part in path.split("."):
        step = []
        optional, part = part.endswith("?"), part.removesuffix("?")
        for item in found:
            if part == "*":
                step.extend(item.values() if isinstance(item, dict) else item)
            elif isinstance(item, dict) and part in item:
                step.append(item[part])
            elif isinstance(item, list) and part.isdigit():
                step.append(item[int(part)])
            elif not optional:
                raise KeyError(f"{path}: no {part!r}")
        found = step
    if not found:
        raise KeyError(f"{path}: nothing there")
    return found


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def shown(vals: list[Any], unit: str) -> str:
    numbers = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(vals) > 1 and len(numbers) == len(vals):
        lo, hi = min(numbers), max(numbers)
        text = _number(lo) if lo == hi else f"{_number(lo)}–{_number(hi)}"
    else:
        text = ", ".join(_number(v) for v in vals)
    return f"{text} {unit}".strip()


def page() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Measured on the project's 2-core, 24 GiB machine with `make bench` (`python -m bench.run`); every",
        "benchmark compares against a baseline in the same run and writes `bench/results/<name>.json`. This page",
        "is generated from those files (`python -m bench.report`); a range is over the runs or cases a file",
        "holds. The pages of each area say what the figures mean and what limits them.",
        "",
    ]
    for name, title, figures in FIGURES:
        data = json.loads((RESULTS / name).read_text())
        date = data.get("date") or data.get("meta", {}).get("date") or "undated"
        lines += [
            f"## {title}",
            "",
            f"`bench/results/{name}`, {date[:10]}",
            "",
            "| figure | value | field |",
            "|---|---|---|",
        ]
        for what, path, unit in figures:
            lines.append(f"| {what} | {shown(values(data, path), unit)} | `{path}` |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = page()
    if "--check" in argv:
        if PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
