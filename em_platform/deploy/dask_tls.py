"""Dask's TLS in the deployment: certificates made at the stack's first start, and the settings that make
every scheduler, worker and client speak only TLS with them; on one machine (:func:`tls_env`) too.

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


def tls_env(folder: Path) -> dict[str, str]:
    """:data:`TLS_ENV` for a cluster on this machine (``make deploy-local``, ``make dev``): its certificates
    made in ``folder`` (once) for loopback. A scheduler on 127.0.0.1 still runs what any local user sends it,
    as the user who started it: only a client with the certificate may connect."""
    folder = Path(folder)
    make_certificates(folder, ("localhost", "127.0.0.1"))
    return {key: value.replace(CERTS, str(folder)) for key, value in TLS_ENV.items()}


def security(env: dict[str, str]):
    """A Dask client's :class:`~distributed.security.Security` from the settings of :func:`tls_env`."""
    from distributed.security import Security

    return Security(
        require_encryption=True,
        tls_ca_file=env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"],
        tls_client_cert=env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"],
        tls_client_key=env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"],
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else CERTS)
    made = make_certificates(folder)
    print(f"Dask TLS certificates {'made' if made else 'already'} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
