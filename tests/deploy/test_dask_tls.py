"""Dask's TLS in the deployment (em_platform/deploy/dask_tls.py): the certificates made at the first start
carry a real cluster; a client without them, or speaking plain TCP, gets no connection."""

from __future__ import annotations

import stat

import pytest

from em_platform.deploy.dask_tls import CA, CERT, KEY, TLS_ENV, make_certificates


def test_certificates_are_made_once_and_the_key_is_private(tmp_path):
    assert make_certificates(tmp_path) is True
    first = (tmp_path / CERT).read_bytes()
    assert make_certificates(tmp_path) is False and (tmp_path / CERT).read_bytes() == first  # kept
    assert stat.S_IMODE((tmp_path / KEY).stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*"))  # no partial file left
    assert TLS_ENV["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"


def test_a_cluster_runs_on_them_and_refuses_a_client_without_them(tmp_path):
    from distributed import Client, LocalCluster
    from distributed.security import Security

    make_certificates(tmp_path)
    files = {"tls_ca_file": str(tmp_path / CA)}
    for role in ("client", "scheduler", "worker"):
        files |= {f"tls_{role}_cert": str(tmp_path / CERT), f"tls_{role}_key": str(tmp_path / KEY)}
    security = Security(require_encryption=True, **files)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tls://",
        security=security,
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with Client(address, security=security, timeout="20s") as client:
            assert client.submit(lambda: 41 + 1).result() == 42
        with pytest.raises((OSError, TimeoutError)):  # plain TCP to the TLS port
            Client(address.replace("tls://", "tcp://"), timeout="3s")
        stranger = tmp_path / "stranger"
        make_certificates(stranger)  # a certificate from another CA
        foreign = Security(
            require_encryption=True,
            tls_ca_file=str(stranger / CA),
            tls_client_cert=str(stranger / CERT),
            tls_client_key=str(stranger / KEY),
        )
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=foreign, timeout="3s")
