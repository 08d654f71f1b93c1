"""`em-platform demo`: the platform's main job end to end on the embedded defaults.

Writes sample volumes into the inbox, ticks the inbox sensor once, launches what it requests through the
code location on the instance in $DAGSTER_HOME (the same instance and data root as `make dev` and the
`dagster` commands, so the runs show on the UI's job pages, timeline and asset history), refreshes the
catalog, and prints a short summary: one line per failed entry, the tracebacks stay in the run's log.
Runs carry the sensor's run keys, so a second demo (or the daemon later) launches nothing for entries
already ingested.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from em_platform.launch import CodeLocationRuns, failure_reason, one_line
from em_platform.resources import InboxResource
from em_platform.samples import write_samples
from em_platform.settings import ensure_dagster_home, load_settings

DEMO_MONTAGE = "demo-montage-5x5"


class DemoRuns:
    """Runs launched through the code location, each on one progress line; failures kept as one-line reasons."""

    def __init__(self, dagster_home: str, out):
        self.out = out
        self._runs = CodeLocationRuns(dagster_home).__enter__()
        self.instance = self._runs.instance
        self.failures: dict[str, tuple[str, str]] = {}  # partition (or job) -> (one-line reason, run id)

    def run(self, job_name: str, label: str, **kwargs) -> bool:
        print(f"{job_name}: {label} ...", end=" ", file=self.out, flush=True)
        started = time.monotonic()
        with warnings.catch_warnings():
            # distributed's LocalCluster takes another port when 8787 is busy; it says so on every run
            warnings.filterwarnings("ignore", message="Port 8787 is already in use")
            run = self._runs.run(job_name, **kwargs)
        seconds = time.monotonic() - started
        if run.status == dg.DagsterRunStatus.SUCCESS:
            print(f"ok ({seconds:.1f} s)", file=self.out, flush=True)
            return True
        self.failures[label] = (failure_reason(self.instance, run.run_id), run.run_id[:8])
        print(
            f"{run.status.value.lower()} ({seconds:.1f} s, run {run.run_id[:8]})", file=self.out, flush=True
        )
        return False

    def close(self) -> None:
        self._runs.__exit__(None, None, None)


def _already_ran(instance: dg.DagsterInstance, sensor_name: str, run_key: str) -> bool:
    tags = {RUN_KEY_TAG: run_key, SENSOR_NAME_TAG: sensor_name}
    return bool(instance.get_runs(filters=dg.RunsFilter(tags=tags), limit=1))


def tick_and_run(defs, runs: DemoRuns, sensor_name: str, resources: dict) -> tuple[list[str], list[str]]:
    """Evaluate a sensor once and launch what it requests through the code location, as the daemon would.

    The runs carry the sensor's name and run key, so neither a later demo nor the daemon launches them again.
    """
    instance = runs.instance
    sensor = defs.resolve_sensor_def(sensor_name)
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=defs, resources={**defs.resources, **resources}
    ) as ctx:
        tick = sensor.evaluate_tick(ctx)
    for req in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    ran: list[str] = []
    failed: list[str] = []
    for req in tick.run_requests or []:
        if _already_ran(instance, sensor_name, req.run_key):
            continue
        tags = {**req.tags, RUN_KEY_TAG: req.run_key, SENSOR_NAME_TAG: sensor_name}
        ok = runs.run(sensor.job_name, req.partition_key, partition_key=req.partition_key, tags=tags)
        (ran if ok else failed).append(req.partition_key)
    return ran, failed


def simulate_demo_montage(settings, out) -> bool:
    """Acquire the demo montage with the embedded scope, once (5 x 5 tiles, one of them blank)."""
    from em_platform.simulation.scope import simulate_montage
    from em_platform.simulation.scope_config import ScopeConfig
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url)
    try:
        if journal.montage(DEMO_MONTAGE) is not None:
            return False
        cfg = ScopeConfig(rows=5, columns=5, overlap=0.15, jitter_px=8.0, faults=("blank:12",), seed=7)
        out_dir = Path(settings.data_root) / "scope" / DEMO_MONTAGE
        simulate_montage(cfg, out_dir, journal.record, montage_id=DEMO_MONTAGE, sleep=lambda s: None)
        print(
            f"scope-sim: montage {DEMO_MONTAGE} acquired (5 x 5 tiles of 512² px, a blank tile injected)",
            file=out,
        )
        return True
    finally:
        journal.dispose()


def simulate_demo_tilt_series(defs, runs: DemoRuns, settings, out) -> list[str]:
    """One small simulated cryo-ET tilt series from the demo spec in EM_SIMULATIONS, once."""
    from em_platform.resources import SimulationSpecsResource
    from em_platform.simulation.cryoet.examples import DEMO_SPEC_NAME, write_demo_spec

    write_demo_spec(Path(settings.simulations))
    specs = {"simulation_specs": SimulationSpecsResource(path=settings.simulations)}
    ran, failed = tick_and_run(defs, runs, "simulation_sensor", specs)
    folder = Path(settings.data_root, "simulation", DEMO_SPEC_NAME, f"{DEMO_SPEC_NAME}_000")
    if (folder / "ground_truth.json").exists():
        seconds = _simulation_seconds(runs.instance, folder.name) if ran else None
        print(
            f"\ncryo-ET simulation{' (new)' if ran else ': nothing new to simulate, the earlier one is'}: {folder} "
            "(tilt series, mdoc, movies, ground_truth.json)"
            + (f", simulated in {seconds:.1f} s" if seconds is not None else ""),
            file=out,
        )
    return failed


def process_demo_tilt_series(defs, runs: DemoRuns, settings, out) -> list[str]:
    """Cryo-ET processing of the simulated stack (motion, CTF, alignment, tomogram, denoising, evaluation
    against its ground truth), once: the cryo sensor's tick, its settle period waived (the simulator
    publishes whole stacks)."""
    from em_platform.resources import CryoSessionsResource

    sessions = {
        "cryo_sessions": CryoSessionsResource(
            sessions=settings.cryo_sessions,
            simulation=str(Path(settings.data_root) / "simulation"),
            settle_seconds=0,
        )
    }
    ran, failed = tick_and_run(defs, runs, "cryo_sensor", sessions)
    for key in ran:
        print(f"cryo-ET processing: {key} reconstructed and evaluated against its ground truth", file=out)
    return failed


def _simulation_seconds(instance: dg.DagsterInstance, stack: str) -> float | None:
    """The simulator's own wall time for a stack (``seconds`` of its latest simulation/tilt_series)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["simulation", "tilt_series"]), asset_partitions=[stack]),
        limit=1,
    ).records
    if not records:
        return None
    materialization = records[0].asset_materialization
    assert materialization is not None  # fetch_materializations returns materializations
    entry = materialization.metadata.get("seconds")
    if entry is None:
        return None
    assert isinstance(entry.value, int | float)  # a number (assets/simulation.py writes it)
    return float(entry.value)


def run_demo(out=sys.stdout) -> int:
    from em_platform.definitions import defs

    settings = load_settings()
    # One Dagster home for every entry point: make, this CLI and `dagster` commands (em-platform settings).
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(settings.dagster_home))
    inbox = Path(settings.inbox)
    new = write_samples(inbox)
    print(
        f"inbox {inbox}: {len(new)} new sample(s) written"
        + (f" ({', '.join(p.name for p in new)})" if new else ""),
        file=out,
    )
    runs = DemoRuns(os.environ["DAGSTER_HOME"], out)
    instance = runs.instance
    try:
        # The samples are written atomically, so the demo need not wait out the settle period.
        inbox_res = {"inbox": InboxResource(path=str(inbox), settle_seconds=0)}
        ran, failed = tick_and_run(defs, runs, "inbox_sensor", inbox_res)
        m_ran: list[str] = []
        m_failed: list[str] = []
        if "://" not in settings.data_root:  # the simulated scope writes tile files to the local data root
            simulate_demo_montage(settings, out)
            m_ran, m_failed = tick_and_run(defs, runs, "montage_sensor", {})
        s_failed = (
            simulate_demo_tilt_series(defs, runs, settings, out) if "://" not in settings.data_root else []
        )
        if "://" not in settings.data_root and not s_failed:
            s_failed += process_demo_tilt_series(defs, runs, settings, out)
        catalog_stale = bool(ran or failed or m_ran) or not instance.get_latest_materialization_event(
            dg.AssetKey(["catalog", "metadata_catalog"])
        )
        if catalog_stale and not runs.run("catalog_job", "catalog/metadata_catalog"):
            failed.append("catalog/metadata_catalog")
        # the storage check has a result from the first demo on, not only after its first 04:00
        never_checked = not instance.get_runs(
            filters=dg.RunsFilter(job_name="storage_consistency_job"), limit=1
        )
        if (catalog_stale or never_checked) and not runs.run(
            "storage_consistency_job", "storage_consistency"
        ):
            failed.append("storage_consistency")
    finally:
        runs.close()
    _print_summary(settings, ran, failed, runs.failures, out)
    if "://" not in settings.data_root:
        _print_qc(settings, m_ran, m_failed, runs.failures, out)
    failed += m_failed + s_failed
    print("browse runs and lineage: make dev, then http://127.0.0.1:3000", file=out)
    return 1 if failed else 0


def _print_qc(settings, ran: list[str], failed: list[str], reasons: dict[str, tuple[str, str]], out) -> None:
    from em_platform.catalog.db import CatalogDB
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url)
    catalog = CatalogDB(settings.catalog_url)
    try:
        print("", file=out)
        print(
            f"montages this time: {len(ran)} processed, {len(failed)} failed"
            + ("" if ran or failed else " (nothing new)"),
            file=out,
        )
        for m in journal.montages_after(0):
            tiles = [t for t in journal.tiles(m.montage_id) if not t.is_reference]
            judged = [t for t in tiles if t.qc_passed is not None]
            statuses = journal.qc_statuses(m.montage_id)
            status, reason = statuses[-1] if statuses else ("(not processed)", None)
            print(
                f"  montage {m.montage_id}: {len(tiles)} tiles, {sum(1 for t in judged if t.qc_passed)}/{len(judged)} passed QC, "
                f"qc.status {status}" + (f" ({reason})" if reason else ""),
                file=out,
            )
            for t in judged:
                for f in t.qc_faults or []:
                    print(f"    tile r{t.row} c{t.column}: {f['fault_type']} ({f['scope']})", file=out)
            if m.montage_id in reasons:
                print(f"    failed: {reasons[m.montage_id][0]} (run {reasons[m.montage_id][1]})", file=out)
            record = catalog.find("acquisition", m.montage_id)
            if record and record["status"] == "complete":
                core, metrics = record["metadata"]["core"], record["metadata"]["quality"]["metrics"]
                lay = metrics["layout"]
                print(
                    f"    stitched: {lay['edges']} matches, {lay['rejected_edges']} rejected, RMS residual "
                    f"{lay['rms_residual_px']} px; fused {core['volume_shape'][0]} x {core['volume_shape'][1]} px "
                    f"at {core['voxel_size_nm']['x']:.4g} nm",
                    file=out,
                )
                print(f"    uploaded: {record['files']['volume']}", file=out)
    finally:
        journal.dispose()
        catalog.dispose()


def voxel_text(core: dict) -> str:
    """The voxel size with its axes, e.g. ``8,5,5 (zyx)`` or ``4,4 (yx, assumed)``; 4 significant digits."""
    vox = core.get("voxel_size_nm") or {}
    axes = [a for a in ("z", "y", "x") if a in vox]
    if not axes:
        return "-"
    notes = "".join(axes) + (", assumed" if core.get("voxel_size_source") == "assumed" else "")
    return ",".join(f"{vox[a]:.4g}" for a in axes) + f" ({notes})"


def shorten(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters: the middle replaced by '…' (both ends of an id stay readable)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def format_table(headers: list[str], rows: list[list[str]], max_widths: list[int]) -> list[str]:
    """Left-aligned columns as wide as their widest cell, at most ``max_widths`` (longer cells shortened)."""
    rows = [[shorten(c, w) for c, w in zip(row, max_widths, strict=True)] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]


def _relative(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def _print_summary(
    settings, ran: list[str], failed: list[str], reasons: dict[str, tuple[str, str]], out
) -> None:
    from em_platform.catalog.db import CatalogDB

    db = CatalogDB(settings.catalog_url)
    records = db.records()
    db.dispose()
    print("", file=out)
    print(
        f"runs this time: {len(ran)} ingested, {len(failed)} failed"
        + ("" if ran or failed else " (nothing new)"),
        file=out,
    )
    print(
        f"catalog {settings.catalog_url}: {len(records)} record(s); outputs under {settings.data_root}",
        file=out,
    )
    rows = []
    for r in records:
        core = r["metadata"]["core"]
        shape = "x".join(map(str, core.get("volume_shape", []))) or "-"
        output = _relative(r.get("files", {}).get("volume") or "", settings.data_root) or "-"
        rows.append(
            [r["source_id"], r["status"], shape, core.get("data_type", "-"), voxel_text(core), output]
        )
    headers = ["source_id", "status", "shape", "dtype", "voxel nm", "output"]
    for line in format_table(headers, rows, [32, 11, 18, 8, 26, 60]):
        print(line, file=out)
    errors = {
        r["source_id"]: (r.get("error") or {}).get("message", "") for r in records if r["status"] == "failed"
    }
    if errors or failed:
        print("failed (one line each; the traceback is in the run's log in the UI):", file=out)
    for key in dict.fromkeys([*errors, *failed]):
        reason, run_id = reasons.get(key, ("", ""))
        text = one_line(errors[key]) if errors.get(key) else reason or "failed"
        print(f"  {key}: {text}" + (f" (run {run_id})" if run_id else ""), file=out)
    exports = (
        sorted(Path(settings.data_root, "catalog").glob("metadata_catalog_*.json"))
        if "://" not in settings.data_root
        else []
    )
    if exports:
        print(f"catalog export: {exports[-1]}", file=out)
