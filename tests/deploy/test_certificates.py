"""The deployment's private CAs vouch only for the names they serve, and keys and secret files are private
from the moment they exist."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from em_platform.deploy import certificates
from em_platform.deploy.proxy_tls import names as proxy_names
from em_platform.deploy.stack import write_env_file

PEM = serialization.Encoding.PEM


def _handshake(tmp_path: Path, ca, cert, key, server_name: str) -> str | None:
    """A TLS server with ``cert``; a client trusting only ``ca`` connects to ``server_name``: None when it
    accepts the server, else OpenSSL's reason."""
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name):
                return None
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message
    finally:
        listener.close()


def test_a_ca_signs_for_its_names_only(tmp_path):
    """Had the proxy's CA key leaked before it was thrown away, a certificate it signs for another site is
    still refused by every client that trusts it (OpenSSL checks the CA's name constraint)."""
    served = proxy_names("em.facility.example")
    ca, ca_key = certificates.certificate_authority(served, "em_platform proxy")
    constraint = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraint.critical
    own, own_key = certificates.signed_certificate(ca, ca_key, served, "em_platform proxy")
    assert _handshake(tmp_path, ca, own, own_key, "em.facility.example") is None
    for forged in ("bank.example", "8.8.8.8"):
        cert, key = certificates.signed_certificate(ca, ca_key, (forged,), "forged")
        reason = _handshake(tmp_path, ca, cert, key, forged)
        assert reason is not None and ("subtree" in reason or "name constraint" in reason), reason
    # no address among the names: none at all may be vouched for
    only_names = certificates.certificate_authority(("dask-scheduler", "localhost"), "Dask")[0]
    excluded = only_names.extensions.get_extension_for_class(x509.NameConstraints).value.excluded_subtrees
    assert {str(e.value) for e in excluded} == {"0.0.0.0/0", "::/0"}


def test_keys_and_the_env_file_are_private_from_their_creation(tmp_path, monkeypatch):
    """With a umask that would make them world-readable and chmod refused, they are still 0600: they are
    never written wider and narrowed afterwards."""
    previous = os.umask(0)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod after writing"))
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: pytest.fail("chmod after writing"))
    try:
        assert certificates.make_certificates(tmp_path / "certs", ("localhost",), common_name="t")
        write_env_file(tmp_path / "stack.env", "podman")
    finally:
        os.umask(previous)
    modes = {
        p.name: oct(p.stat().st_mode & 0o777)
        for p in [*(tmp_path / "certs").iterdir(), tmp_path / "stack.env"]
    }
    assert modes == {"ca.pem": "0o644", "cert.pem": "0o644", "key.pem": "0o600", "stack.env": "0o600"}
    assert not list(tmp_path.glob("**/.*partial"))
