"""A private CA and one certificate it signed, made where a deployment first starts (Dask's cluster, the
broker's STOMP TLS port, the proxy's HTTPS): no certificate is shipped or baked into an image, and no CA key
is kept.

The CA may sign for the names it serves and nothing else (a critical name constraint, RFC 5280 4.2.1.10): a
browser or client told to trust it trusts it for those names only, even if its key had leaked before it was
thrown away. Written under temporary names and renamed, the key last and created private (0600 from the
start), so a reader never finds half a set; a folder that holds all three files is left as it is (the
certificates outlive restarts: remove the volume to replace them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from em_platform.storage.private import write_private

CA, CERT, KEY = "ca.pem", "cert.pem", "key.pem"
VALID_DAYS = 3650


def make_certificates(
    folder: Path, names: tuple[str, ...], *, common_name: str, key_owner: tuple[int, int] | None = None
) -> bool:
    """A CA and one server-and-client certificate for ``names`` (host names or IP addresses) in ``folder``,
    unless they are there; True when made. ``key_owner`` (uid, gid): who may read the key (mode 0600),
    for a server that runs as another user than the one making it."""
    from cryptography.hazmat.primitives import serialization

    if all((folder / name).is_file() for name in (CA, CERT, KEY)):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = certificate_authority(names, common_name)
    cert, key = signed_certificate(ca, ca_key, names, common_name)
    pem = serialization.Encoding.PEM
    files = {
        CA: ca.public_bytes(pem),
        CERT: cert.public_bytes(pem),
        KEY: key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for name, data in files.items():
        if name != KEY:
            write_private(folder / name, data, mode=0o644)  # certificates are public
        elif key_owner is None:
            write_private(folder / name, data)
        else:  # private to the server's user: given to it before a byte is written
            partial = folder / f".{name}.owned"
            partial.unlink(missing_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                os.fchown(out.fileno(), *key_owner)
                out.write(data)
            partial.replace(folder / name)
    return True


def certificate_authority(names: tuple[str, ...], common_name: str):
    """(certificate, key) of a CA that may sign for ``names`` only (the caller drops the key when done)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(name_constraints(names), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def signed_certificate(ca, ca_key, names: tuple[str, ...], common_name: str):
    """(certificate, key) for ``names``, server and client, signed by ``ca``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([_alt_name(n) for n in dict.fromkeys(names)]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def name_constraints(names: tuple[str, ...]):
    """The CA's constraint: it signs for ``names`` only (host names and their subdomains, the addresses
    themselves); with no address among them, no address at all."""
    from cryptography import x509

    dns: list[x509.GeneralName] = []
    ips: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            dns.append(x509.DNSName(name))
        else:
            ips.append(x509.IPAddress(ipaddress.ip_network(ip)))
    excluded = None if ips else [x509.IPAddress(ipaddress.ip_network(n)) for n in ("0.0.0.0/0", "::/0")]
    return x509.NameConstraints(permitted_subtrees=dns + ips, excluded_subtrees=excluded)


def _alt_name(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
