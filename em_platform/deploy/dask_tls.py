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

import sys
from pathlib import Path

from em_platform.deploy import certificates
from em_platform.deploy.certificates import CA, CERT, KEY

CERTS = "/opt/dask-certs"  # where the certificates volume is mounted

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
    """The cluster's CA and certificate (for ``names``) in ``folder``, unless they are there; True when made."""
    return certificates.make_certificates(folder, names, common_name="em_platform Dask")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else CERTS)
    made = make_certificates(folder)
    print(f"Dask TLS certificates {'made' if made else 'already'} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
