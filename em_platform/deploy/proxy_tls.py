"""The proxy's HTTPS certificate, made at the stack's first start by ``proxy-certs``
(``python -m em_platform.deploy.proxy_tls /certs``): a CA constrained to the names the proxy serves
(localhost, 127.0.0.1, ::1 and ``EM_PUBLIC_HOST``) and one certificate it signed, which Caddy serves
(docker/proxy/Caddyfile). Browsers are told to trust the CA (``python -m em_platform.deploy compose-ca``);
it can vouch for nothing else. To use the facility's own certificate instead, replace the two files in the
``proxy-certs`` volume (or the ``tls`` lines of the Caddyfile).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from em_platform.deploy import certificates
from em_platform.web_guard.rules import host_name

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def names(public_host: str) -> tuple[str, ...]:
    """The names the proxy answers to: loopback and the facility's name (or address) for it."""
    public = host_name(public_host)
    if public is None:
        raise SystemExit(f"EM_PUBLIC_HOST={public_host!r} is no host name or address")
    return tuple(dict.fromkeys([*LOOPBACK, public]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "/certs")
    served = names(os.environ.get("EM_PUBLIC_HOST", "127.0.0.1"))
    made = certificates.make_certificates(folder, served, common_name="em_platform proxy")
    print(f"proxy TLS certificate for {', '.join(served)} {'made' if made else 'already'} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
