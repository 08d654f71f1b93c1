"""A private CA and one certificate it signed, made where a deployment first starts (Dask's cluster, the
broker's STOMP TLS port): no certificate is shipped or baked into an image, and no CA key is kept.

Written under temporary names and renamed, the key last, so a reader never finds half a set; a folder that
holds all three files is left as it is (the certificates outlive restarts: remove the volume to replace them).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

CA, CERT, KEY = "ca.pem", "cert.pem", "key.pem"
VALID_DAYS = 3650


def make_certificates(
    folder: Path, names: tuple[str, ...], *, common_name: str, key_owner: tuple[int, int] | None = None
) -> bool:
    """A CA and one server-and-client certificate for ``names`` (host names or IP addresses) in ``folder``,
    unless they are there; True when made. ``key_owner`` (uid, gid): who may read the key (mode 0600),
    for a server that runs as another user than the one making it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if all((folder / name).is_file() for name in (CA, CERT, KEY)):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(
            x509.SubjectAlternativeName([_alt_name(n) for n in dict.fromkeys(names)]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        CA: ca.public_bytes(pem),
        CERT: cert.public_bytes(pem),
        KEY: key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for name, data in files.items():
        partial = folder / f".{name}.partial"
        partial.write_bytes(data)
        partial.chmod(0o600 if name == KEY else 0o644)
        if name == KEY and key_owner is not None:
            import os

            os.chown(partial, *key_owner)
        partial.replace(folder / name)
    return True


def _alt_name(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
