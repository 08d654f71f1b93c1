"""A run's Dask scheduler on the session's real SLURM, as the platform starts it (:func:`start_cluster`): by default
it listens at this host's cluster address, which its worker jobs are given, and on loopback, and both speak only
TLS with the run's certificates: a plain-TCP client, a client of another CA and a client that trusts the run's CA
but shows another certificate are each refused, the run's own client is answered. Off, only when
``EM_SLURM_TLS`` says so, the run is warned, naming the setting and what anyone can then do."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import stat

import pytest
from dask.distributed import Client
from distributed.comm import connect
from distributed.security import Security

from em_platform.cluster.slurm import JobLog, SlurmSettings, release, start_cluster


def _use(slurm, monkeypatch) -> None:
    """dask-jobqueue runs sbatch/scancel with this process's environment: the session's cluster in it."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)


def _settings(slurm, **env: str) -> SlurmSettings:
    """The platform's settings as an operator sets them, one worker job at most."""
    return SlurmSettings.from_env(
        {
            "EM_SLURM_QUEUE": slurm.partition,
            "EM_SLURM_MEMORY": "1GB",
            "EM_SLURM_WALLTIME": "00:10:00",
            "EM_SLURM_MAX_JOBS": "1",
            "EM_SLURM_START_TIMEOUT": "60",
            **env,
        }
    )


def _handshake(address: str, security: Security | None = None) -> dict:
    """Dask's own connection and handshake to ``address`` as a client with ``security``: the scheduler's
    handshake, or the error it ended with (raised)."""

    async def go() -> dict:
        args = security.get_connection_args("client") if security is not None else {}
        comm = await connect(address, timeout="10s", **args)
        try:
            return comm.remote_info
        finally:
            await comm.close()

    return asyncio.run(go())


def _refused(address: str, security: Security | None = None) -> str:
    """The error a client is refused with, at once (not a timeout: a scheduler that merely did not answer)."""
    with pytest.raises(OSError) as refused:
        _handshake(address, security)
    assert "Timed out" not in str(refused.value), refused.value
    return f"{type(refused.value).__name__}: {refused.value}"


def _host(address: str) -> str:
    return address.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")


def test_by_default_the_scheduler_speaks_only_tls_at_the_cluster_address_and_on_loopback(
    slurm, tmp_path, monkeypatch
):
    _use(slurm, monkeypatch)
    settings = _settings(slurm)  # EM_SLURM_TLS unset
    log = JobLog()
    cluster = start_cluster(settings, log, str(tmp_path / "logs"))
    try:
        listeners = [listener.contact_address for listener in cluster.scheduler.listeners]
        assert len(listeners) == 2, listeners
        outside, loopback = listeners
        host = _host(outside)
        assert outside.startswith("tls://") and not ipaddress.ip_address(host).is_loopback, listeners
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))  # an address of this host
        assert loopback.startswith("tls://127.0.0.1:"), listeners
        assert cluster.scheduler_address == outside  # what the worker jobs are told to connect to
        assert f"tls://{host}" in cluster.job_script()

        # the workers' copies: a 0700 folder of the run's, each file 0600, named in the job script
        (folder,) = (tmp_path / "logs").glob(".tls-*")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {0o600} and len(modes) == 3, modes
        assert f"--tls-key {folder}/worker-key.pem" in cluster.job_script()

        run_ca = cluster.security.tls_ca_file
        stranger = Security.temporary()
        for address in listeners:
            plain = _refused("tcp://" + address.split("://", 1)[1])
            other_ca = _refused(address, stranger)
            # trusts the run's CA (so it accepts the scheduler) but shows a certificate of another CA
            other_cert = _refused(
                address,
                Security(
                    require_encryption=True,
                    tls_ca_file=run_ca,
                    tls_client_cert=stranger.tls_client_cert,
                    tls_client_key=stranger.tls_client_key,
                ),
            )
            print(f"{address}: plain {plain}; other CA {other_ca}; other certificate {other_cert}")
            assert "Connection reset" in plain or "closed" in plain, plain  # no TLS handshake: dropped
            # the scheduler's alert (not the run's CA); in TLS 1.3 the client's side of the handshake is done
            # before the server judges its certificate, so the alert may come as the connection's end instead
            assert "UNKNOWN_CA" in other_cert or "EOF occurred" in other_cert, other_cert
            assert _handshake(address, cluster.security)["address"] == address

        with Client(cluster) as client:  # the run's own client, as the Dask resource makes it
            assert client.scheduler.address == outside
            client.wait_for_workers(1, timeout=60)
            workers = list(client.scheduler_info()["workers"])
            assert workers and all(w.startswith("tls://") for w in workers), workers
            assert client.submit(sum, [1, 2, 3]).result() == 6
            release(client, cluster, log)
    finally:
        cluster.close()
    assert not list((tmp_path / "logs").glob(".tls-*")), "the run's certificates outlived its cluster"


def test_tls_is_off_only_when_the_setting_says_so_and_the_run_is_warned(slurm, tmp_path, monkeypatch, caplog):
    _use(slurm, monkeypatch)
    settings = _settings(slurm, EM_SLURM_TLS="false")
    caplog.set_level(logging.WARNING, logger="em_platform.cluster.slurm")
    cluster = start_cluster(settings, JobLog(), str(tmp_path / "logs"))
    try:
        listeners = [listener.contact_address for listener in cluster.scheduler.listeners]
        warnings = [r for r in caplog.records if r.name == "em_platform.cluster.slurm"]
        assert [r.levelname for r in warnings] == ["WARNING"], caplog.text
        said = warnings[0].getMessage()
        assert said.startswith("EM_SLURM_TLS is off") and "run code in this run's process" in said, said
        assert all(address in said for address in listeners), (listeners, said)
        # what it says is so: a client with no certificate is answered
        assert all(address.startswith("tcp://") for address in listeners), listeners
        assert _handshake(listeners[0])["address"] == listeners[0]
        assert not list((tmp_path / "logs").glob(".tls-*"))
    finally:
        cluster.close()
