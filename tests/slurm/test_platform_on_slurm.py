"""The platform's Dask work on SLURM jobs (issue 37): a cryo tilt series, a montage and an inbox ingest through Dagster with
``EM_COMPUTE=slurm``, against the session's real slurmctld/slurmd, give the same results as the same runs on
the local cluster; each worker job is in the run's tags, and SLURM's own record shows it COMPLETED (or, still
queued when the work ended, cancelled before it started)."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import dagster as dg
import mrcfile
import numpy as np
import pytest
import zarr

from em_platform.assets.cryo import ctf, motion_corrected, tilt_alignment, tomogram
from em_platform.catalog.db import CatalogDB
from em_platform.cluster.slurm import SharedStorageMissing
from em_platform.resources import CatalogResource, CryoSessionsResource, DaskResource, StorageResource
from em_platform.samples import write_samples
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal
from tests.cryo.synthetic import make_tilt_series
from tests.support.platform import make_platform

CRYO = [motion_corrected, ctf, tilt_alignment, tomogram]


def slurm_env(slurm, tmp_path: Path, **extra: str) -> dict[str, str]:
    """What a facility sets to run the platform's Dask work on its SLURM: here the session's cluster."""
    return {
        **slurm.env,
        "EM_COMPUTE": "slurm",
        "EM_SLURM_QUEUE": slurm.partition,
        "EM_SLURM_CORES": "1",
        "EM_SLURM_MEMORY": "1GB",
        "EM_SLURM_WALLTIME": "00:10:00",
        "EM_SLURM_MIN_JOBS": "1",
        "EM_SLURM_MAX_JOBS": "2",
        "EM_SLURM_START_TIMEOUT": "60",
        "EM_SLURM_LOG_DIRECTORY": str(tmp_path / "slurm-logs"),
        **extra,
    }


def use_slurm(slurm, tmp_path: Path, monkeypatch, **extra: str) -> dict[str, str]:
    """:func:`slurm_env` set in this process's environment, where the Dask resource reads it; returned too."""
    env = slurm_env(slurm, tmp_path, **extra)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _platform(slurm, tmp_path: Path, where: str, monkeypatch):
    """The platform under ``tmp_path/where``: on the local cluster, or (``slurm``) on the session's SLURM."""
    env = use_slurm(slurm, tmp_path, monkeypatch) if where == "slurm" else {}
    return make_platform(tmp_path / where, extra_env=env)


def run_jobs(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    tags = instance.get_run_by_id(run_id).tags
    assert float(tags["em/slurm_compute_s"]) > 0 and float(tags["em/slurm_queue_wait_s"]) >= 0, tags
    return tags["em/slurm_jobs"].split(",")


def assert_completed(slurm, job_ids: list[str], logs: Path) -> None:
    """SLURM's own completion record (jobcomp) of each worker job: COMPLETED if its worker joined the run (its
    log in ``logs`` says so); a job adaptive scaling no longer needed before its worker joined (queued, or
    still starting) is CANCELLED: it did nothing."""
    records = [slurm.wait_for_record(job_id) for job_id in job_ids]
    joined = {r["JobId"]: "Registered to:" in _job_log(logs, r["JobId"]) for r in records}
    seen = "; ".join(
        f"job {r['JobId']} {r['JobState']} on {r['NodeList']} {r['StartTime']}..{r['EndTime']}"
        f"{'' if joined[r['JobId']] else ', its worker never joined'}"
        for r in records
    )
    assert any(joined.values()), seen
    for r in records:
        assert r["JobState"] == ("COMPLETED" if joined[r["JobId"]] else "CANCELLED"), seen


def _job_log(logs: Path, job_id: str) -> str:
    """The worker job's stderr (dask-jobqueue names it after the job), where the worker logs its joining."""
    path = logs / f"em-platform-{job_id}.err"
    return path.read_text(errors="replace") if path.exists() else ""


def _cryo_resources(root: Path, sessions: Path, dask: DaskResource) -> dict:
    return {
        "cryo_sessions": CryoSessionsResource(
            sessions=str(sessions), simulation=str(root / "data" / "simulation")
        ),
        "storage": StorageResource(
            root_url=str(root / "data"), buffer_root=str(root / "buffer"), downloads_root=str(root / "dl")
        ),
        "catalog": CatalogResource(url=f"sqlite:///{root / 'catalog.sqlite'}"),
        "dask": dask,
    }


def _mrcs(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.rglob("*.mrc")):
        with mrcfile.open(path, permissive=True) as m:
            out[str(path.relative_to(folder))] = np.array(m.data)
    return out


def test_a_cryo_tilt_series_on_slurm_jobs_equals_the_local_run(slurm, tmp_path, monkeypatch):
    sessions = tmp_path / "sessions"
    make_tilt_series(sessions / "grid1", "TS_01", size=64, angles=(-30, -15, 0, 15, 30), frames=3, seed=5)
    old = time.time() - 60  # settled: the session is not being written
    for path in sessions.rglob("*"):
        os.utime(path, (old, old))
    key = "sessions/grid1/TS_01"
    outputs = {}
    for where in ("local", "slurm"):
        root = tmp_path / where
        if where == "slurm":
            use_slurm(slurm, tmp_path, monkeypatch)
            dask = DaskResource(compute="slurm", data_root=str(root / "data"))
        else:
            dask = DaskResource(n_workers=1, threads_per_worker=1)
        (root / "data").mkdir(parents=True)
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("cryo_tilt_series", [key])
            result = dg.materialize(
                CRYO, instance=instance, partition_key=key, resources=_cryo_resources(root, sessions, dask)
            )
            assert result.success
            meta = result.asset_materializations_for_node("cryo__motion_corrected")[0].metadata
            if where == "slurm":
                assert meta["ran_on"].value == "dask cluster"  # each movie a task on a SLURM worker
                jobs = run_jobs(instance, result.run_id)
                logs = [
                    e.user_message
                    for e in instance.all_logs(result.run_id)
                    if "SLURM worker" in e.user_message
                ]
                assert any(",".join(jobs) in line for line in logs), logs
        outputs[where] = _mrcs(root / "data" / "cryo" / key)
    assert set(outputs["slurm"]) == set(outputs["local"]) and outputs["local"], sorted(outputs["local"])
    for name, local in outputs["local"].items():
        np.testing.assert_allclose(outputs["slurm"][name], local, rtol=1e-5, atol=1e-6, err_msg=name)
    assert_completed(slurm, jobs, tmp_path / "slurm-logs")


def test_a_montage_fused_on_slurm_jobs_equals_the_local_run(slurm, tmp_path, monkeypatch):
    cfg = ScopeConfig(rows=2, columns=3, overlap=0.15, jitter_px=6.0, seed=7)
    montage_id = "m-slurm-equal"
    fused = {}
    for where in ("local", "slurm"):
        platform = _platform(slurm, tmp_path, where, monkeypatch)
        journal = Journal(platform.settings.catalog_url)
        simulate_montage(
            cfg, tmp_path / where / "tiles", journal.record, sleep=lambda s: None, montage_id=montage_id
        )
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("montages", [montage_id])
            result = platform.defs.resolve_job_def("montage_job").execute_in_process(
                instance=instance,
                partition_key=montage_id,
                raise_on_error=False,
                run_config={"ops": {"montage_tiles": {"config": {"poll_seconds": 0.05}}}},
            )
            assert result.success
            if where == "slurm":
                jobs = run_jobs(instance, result.run_id)
        image = zarr.open_group(
            str(platform.data_root / "acquisition" / montage_id / "montage.ome.zarr"), mode="r"
        )
        fused[where] = np.asarray(image["0"][:])
    assert fused["slurm"].shape == fused["local"].shape and fused["local"].any()
    np.testing.assert_array_equal(fused["slurm"], fused["local"])
    assert_completed(slurm, jobs, tmp_path / "slurm-logs")


def test_workers_that_cannot_see_the_data_root_fail_the_run_at_once_naming_the_path(
    slurm, tmp_path, monkeypatch
):
    """The data root is not mounted on the compute nodes (here: a path no worker has): the run fails before any
    work, naming the worker's host and the path."""
    use_slurm(slurm, tmp_path, monkeypatch)
    missing = tmp_path / "only-on-the-login-node"
    dask = DaskResource(compute="slurm", data_root=str(missing))

    @dg.asset
    def needs_workers(dask: DaskResource) -> None:
        dask.get_client()

    with dg.instance_for_test() as instance:
        with pytest.raises(
            SharedStorageMissing, match=rf"{missing} is not a folder this worker can read and write"
        ):
            dg.materialize([needs_workers], instance=instance, resources={"dask": dask})


def test_by_default_a_run_speaks_tls_at_this_hosts_cluster_address_and_a_plain_client_is_refused(
    slurm, tmp_path, monkeypatch
):
    """EM_SLURM_TLS unset: the run's scheduler listens at a non-loopback address of this host (the worker jobs'
    way in) and on loopback, both with certificates made for the run; the run's client and the worker jobs
    connect with theirs (the workers' 0600 in the shared job folder, gone when the run ends), and a client
    without them gets nothing from the scheduler's port."""
    logs = tmp_path / "slurm-logs"
    env = use_slurm(slurm, tmp_path, monkeypatch)
    assert "EM_SLURM_TLS" not in env and "EM_SLURM_SCHEDULER_HOST" not in env
    seen: dict = {}

    @dg.asset
    def total(dask: DaskResource) -> int:
        from distributed import Client

        client = dask.get_client()
        seen["scheduler"] = client.scheduler.address
        seen["listeners"] = client.run_on_scheduler(
            lambda dask_scheduler: [listener.contact_address for listener in dask_scheduler.listeners]
        )
        seen["workers"] = list(client.scheduler_info()["workers"])
        seen["keys"] = {p.name: p.stat().st_mode & 0o777 for p in logs.glob(".tls-*/*")}
        plain = "tcp://" + client.scheduler.address.split("://", 1)[1]
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout="5s")
        return client.submit(sum, [1, 2, 3]).result()

    with dg.instance_for_test() as instance:
        result = dg.materialize([total], instance=instance, resources={"dask": DaskResource(compute="slurm")})
        assert result.output_for_node("total") == 6
        jobs = run_jobs(instance, result.run_id)
    outside, loopback = seen["listeners"]
    host = outside.split("://", 1)[1].rsplit(":", 1)[0]
    assert seen["scheduler"] == outside and not ipaddress.ip_address(host).is_loopback, seen
    assert outside.startswith("tls://") and loopback.startswith("tls://127.0.0.1:"), seen
    assert all(w.startswith("tls://") for w in seen["workers"]) and seen["workers"], seen
    assert sorted(seen["keys"]) == ["ca.pem", "worker-cert.pem", "worker-key.pem"], seen["keys"]
    assert set(seen["keys"].values()) == {0o600}, seen["keys"]
    assert not list(logs.glob(".tls-*")), "the run's certificates outlived it"
    assert_completed(slurm, jobs, tmp_path / "slurm-logs")


def test_an_inbox_ingest_converted_on_slurm_jobs_equals_the_local_run(slurm, tmp_path, monkeypatch):
    """The ingest's conversion (the OME-Zarr pyramid written by Dask) on SLURM worker jobs reading the inbox
    and writing the data root, both shared: the same image as on the local cluster, bit for bit."""
    entry = "fibsem_crop.ome.tif"
    images = {}
    for where in ("local", "slurm"):
        platform = _platform(slurm, tmp_path, where, monkeypatch)
        write_samples(platform.inbox, include_dm=False)
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("inbox_entries", [entry])
            result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
                instance=instance, partition_key=entry
            )
            assert result.success
            if where == "slurm":
                jobs = run_jobs(instance, result.run_id)  # the conversion asked for workers: SLURM's
        record = CatalogDB(platform.settings.catalog_url).find("local", entry)
        image = zarr.open_group(record["files"]["volume"], mode="r")
        images[where] = {level: np.asarray(image[level][...]) for level in sorted(image.array_keys())}
    assert images["slurm"].keys() == images["local"].keys() and images["local"]
    for level, local in images["local"].items():
        np.testing.assert_array_equal(images["slurm"][level], local, err_msg=f"level {level}")
    assert_completed(slurm, jobs, tmp_path / "slurm-logs")
