"""Dask's TLS in the deployment: certificates made at the stack's first start, and the settings that make
every scheduler, worker and client speak only TLS with them.

A Dask scheduler runs whatever pickled function a client sends it, on workers that hold the S3 keys; on the
compose network it must not answer anyone without the cluster's certificate. ``dask-certs`` (a one-shot
service) makes a certificate authority and one certificate signed by it into the ``dask-certs`` volume the
first time (``python -m em_platform.deploy.dask_tls /opt/dask-certs``); the scheduler, the workers and the
runs mount it read only. Dask's own configuration (``distributed.comm.tls``, ``require-encryption``, the
default scheme ``tls``) does the rest: a plain-TCP connection is refused. The CA's key is not kept: new
certificates mean a new CA (delete the volume; the next start makes both).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

CERTS = "/opt/dask-certs"  # where the certificates volume is mounted
CA, CERT, KEY = "ca.pem", "cert.pem", "key.pem"
VALID_DAYS = 3650

# Dask's configuration as environment variables for every scheduler, worker and client of the deployment
TLS_ENV = {
    "DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME": "tls",
    "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f"{CERTS}/{CA}",
    **{
        f"DASK_DISTRIBUTED__COMM__TLS__{role}__{part}": f"{CERTS}/{name}"
        for role in ("SCHEDULER", "WORKER", "CLIENT")
        for part, name in (("CERT", CERT), ("KEY", KEY))
    },
}


def make_certificates(folder: Path, names: tuple[str, ...] = ("dask-scheduler", "localhost")) -> bool:
    """A CA and one certificate it signed (for ``names``) in ``folder``, unless they are there; True when made.
    Written under temporary names and renamed, the key last, so a reader never finds half a set."""
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
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "em_platform Dask CA")])
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
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "em_platform Dask")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
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
        partial.replace(folder / name)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else CERTS)
    made = make_certificates(folder)
    print(f"Dask TLS certificates {'made' if made else 'already'} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
