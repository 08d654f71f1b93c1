"""EM_COMPUTE=slurm's settings (no SLURM needed): each wrong value is an error naming the variable, TLS is on
unless a word turns it off, the scheduler listens at this host's cluster address and on loopback, the workers
retire before their walltime, and SLURM's reasons are read from squeue's output."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys

import pytest

from em_platform.cluster.slurm import (
    LOOPBACK,
    JobLog,
    SlurmSettings,
    queue_reasons,
    scheduler_hosts,
    slurmctld_address,
    walltime_seconds,
)
from em_platform.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    "text,seconds",
    [("30", 1800), ("05:30", 330), ("01:00:00", 3600), ("2-00", 172800), ("1-02:03:04", 93784), ("0:01", 1)],
)
def test_slurms_time_formats(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize(
    "name,value,says",
    [
        ("EM_SLURM_MEMORY", "lots", "must be an amount such as 4GB"),
        ("EM_SLURM_WALLTIME", "0:30", "at least a minute"),
        ("EM_SLURM_WALLTIME", "soon", "at least a minute"),
        ("EM_SLURM_CORES", "0", "whole number ≥ 1"),
        ("EM_SLURM_MAX_JOBS", "two", "whole number ≥ 1"),
        ("EM_SLURM_QUEUE", "gpu; rm -rf /", "is not a partition name"),
        ("EM_SLURM_START_TIMEOUT", "-1", "seconds > 0"),
        ("EM_SLURM_PYTHON", "python3", "absolute path"),
    ],
)
def test_a_wrong_setting_stops_the_code_location_naming_it(name, value, says):
    with pytest.raises(ConfigError, match=rf"^{name}=.*{says}"):
        load_settings({"EM_COMPUTE": "slurm", name: value})


def test_compute_is_local_or_slurm_and_slurm_brings_its_own_scheduler():
    assert load_settings({}).compute == "local"
    assert load_settings({"EM_COMPUTE": "SLURM"}).compute == "slurm"
    with pytest.raises(ConfigError, match="EM_COMPUTE='pbs' is not one of local, slurm"):
        load_settings({"EM_COMPUTE": "pbs"})
    with pytest.raises(ConfigError, match="unset DASK_SCHEDULER_ADDRESS"):
        load_settings({"EM_COMPUTE": "slurm", "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:8786"})
    with pytest.raises(ConfigError, match="EM_SLURM_MAX_JOBS=1 is below EM_SLURM_MIN_JOBS=2"):
        load_settings({"EM_COMPUTE": "slurm", "EM_SLURM_MIN_JOBS": "2", "EM_SLURM_MAX_JOBS": "1"})


def test_settings_from_the_environment():
    s = SlurmSettings.from_env(
        {
            "EM_SLURM_QUEUE": "cryo",
            "EM_SLURM_ACCOUNT": "em-facility",
            "EM_SLURM_CORES": "8",
            "EM_SLURM_MEMORY": "32GB",
            "EM_SLURM_WALLTIME": "04:00:00",
            "EM_SLURM_DIRECTIVES": "--qos=normal; --constraint=avx2",
            "EM_SLURM_PROLOGUE": "module load python/3.12\nsource /opt/em/venv/bin/activate",
            "EM_SLURM_MAX_JOBS": "16",
            "EM_SLURM_SCHEDULER_HOST": "10.1.0.5",
        }
    )
    assert (s.queue, s.account, s.cores, s.memory, s.max_jobs, s.min_jobs) == (
        "cryo",
        "em-facility",
        8,
        "32GB",
        16,
        1,
    )
    assert s.directives == ("--qos=normal", "--constraint=avx2")
    assert s.prologue == ("module load python/3.12", "source /opt/em/venv/bin/activate")
    assert s.python == sys.executable and s.scheduler_host == "10.1.0.5"
    assert s.lifetime_seconds == 4 * 3600 - 300  # retires 5 min before a 4 h walltime
    assert SlurmSettings(walltime="1").lifetime_seconds == 30  # and half a minute before one minute


def test_queue_reasons_read_squeue():
    def squeue(argv, **kwargs):
        assert argv[:4] == ["squeue", "-h", "-o", "%i|%T|%r"] and argv[-1] == "12,13"
        return subprocess.CompletedProcess(argv, 0, "12|PENDING|PartitionDown\n13|PENDING|Resources\n", "")

    assert (
        queue_reasons(["12", "13"], run=squeue)
        == "job 12 PENDING (PartitionDown); job 13 PENDING (Resources)"
    )
    assert queue_reasons([]) == ""


def test_a_replacement_job_under_the_same_worker_name_is_counted_apart():
    log = JobLog()
    log.submitted("SLURMCluster-0", "1")
    log.joined("SLURMCluster-0")
    log.left("SLURMCluster-0")
    log.submitted("SLURMCluster-0", "2")  # adaptive scaling reuses the lost worker's name
    log.joined("SLURMCluster-0")
    summary = log.summary()
    assert summary["slurm_jobs"] == "1,2" and float(summary["slurm_compute_s"]) >= 0


def test_tls_is_on_unless_a_word_turns_it_off():
    assert SlurmSettings().tls and SlurmSettings.from_env({}).tls
    assert (
        SlurmSettings.from_env({"EM_SLURM_TLS": " "}).tls
        and SlurmSettings.from_env({"EM_SLURM_TLS": "1"}).tls
    )
    for off in ("0", "false", "FALSE", "no", "off"):
        assert not SlurmSettings.from_env({"EM_SLURM_TLS": off}).tls, off
    with pytest.raises(ConfigError, match=r"^EM_SLURM_TLS='maybe' must be 1 \(on\) or 0 \(off\)"):
        load_settings({"EM_COMPUTE": "slurm", "EM_SLURM_TLS": "maybe"})


def test_the_scheduler_listens_at_the_cluster_address_and_on_loopback():
    assert scheduler_hosts(SlurmSettings(scheduler_host="10.1.0.5")) == ["10.1.0.5", LOOPBACK]
    assert scheduler_hosts(SlurmSettings(scheduler_host="127.0.0.1")) == [LOOPBACK]  # said so: loopback only
    assert scheduler_hosts(SlurmSettings(scheduler_host="localhost")) == ["localhost"]
    # unset, slurmctld on this host: the address of this host's default route
    hosts = scheduler_hosts(SlurmSettings(), controller=lambda: "127.0.0.1")
    if hosts == [LOOPBACK]:
        pytest.skip("this host has no address but loopback")
    cluster, loopback = hosts
    assert loopback == LOOPBACK and not ipaddress.ip_address(cluster).is_loopback, hosts
    with socket.socket(socket.AF_INET6 if ":" in cluster else socket.AF_INET) as s:
        s.bind((cluster, 0))  # an address of this host, or bind fails
    # slurmctld reached from that address: the same
    assert scheduler_hosts(SlurmSettings(), controller=lambda: cluster) == hosts


def test_slurmctlds_address_is_read_from_scontrol():
    def scontrol(text: str):
        def run(argv, **kwargs):
            assert argv == ["scontrol", "show", "config"]
            return subprocess.CompletedProcess(argv, 0, text, "")

        return run

    config = "ClusterName = em\nSlurmctldHost[0]        = ctl1(10.2.0.1)\nSlurmctldHost[1]        = ctl2(10.2.0.2)\n"
    assert slurmctld_address(scontrol(config)) == "10.2.0.1"
    named = slurmctld_address(scontrol("SlurmctldHost[0]        = localhost\n"))
    assert named is not None and ipaddress.ip_address(named).is_loopback
    assert slurmctld_address(scontrol("")) is None

    def missing(argv, **kwargs):
        raise FileNotFoundError("scontrol")

    assert slurmctld_address(missing) is None


def test_the_jobs_logs_never_land_in_the_working_folder(tmp_path, monkeypatch):
    from em_platform.cluster.slurm import job_log_directory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    named = SlurmSettings(log_directory=str(tmp_path / "named"))
    assert job_log_directory(named, str(tmp_path / "data")) == str(tmp_path / "named")
    assert job_log_directory(SlurmSettings(), str(tmp_path / "data")) == str(tmp_path / "data" / "slurm-jobs")
    home = tmp_path / "home" / ".em_platform" / "slurm-jobs"
    assert job_log_directory(SlurmSettings(), "s3://em/data") == str(home) and home.is_dir()
    assert job_log_directory(SlurmSettings(), None) == str(home)
