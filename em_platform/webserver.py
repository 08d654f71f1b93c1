"""``python -m em_platform.webserver``: Dagster's webserver behind the guard (:mod:`em_platform.web_guard`).

``dagster-webserver`` 1.13 runs a GraphQL mutation from a cross-site form, a ``text/plain`` POST or a plain
``GET /graphql?query=mutation…``, checks no WebSocket ``Origin`` and may be framed by any page: every page
an operator's browser opens could launch, terminate or delete runs on a UI at 127.0.0.1 or behind a login.
Every topology serves the UI through this module instead (``make dev``, ``make deploy-local``, the compose
``webserver``), so the guard's rules hold wherever the UI is:

    python -m em_platform.webserver [dagster-webserver options]   what ``dagster-webserver`` takes
    python -m em_platform.webserver dev [dagster dev options]     ``dagster dev``, its webserver this one

The webserver answers to loopback, to the address it is bound to and to the names in ``EM_WEB_HOSTS``
(comma-separated: the names the facility's browsers use, e.g. the proxy's public name).

The guard is put in by replacing the function ``dagster_webserver.cli`` builds its ASGI app with (and, for
``dev``, the command ``dagster dev`` starts its webserver with): Dagster has no hook for middleware. Its
tests (tests/web_guard) fail if a Dagster release moves either.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence

from em_platform.web_guard.rules import Policy, host_name

HOSTS_SETTING = "EM_WEB_HOSTS"
_EVERY_ADDRESS = ("", "0.0.0.0", "::")


def web_hosts(env: Mapping[str, str], bound: str | None) -> list[str]:
    """The host names the UI answers to besides loopback: the address it is bound to, then EM_WEB_HOSTS."""
    names = [] if bound in _EVERY_ADDRESS or bound is None else [bound]
    for entry in filter(None, (e.strip() for e in env.get(HOSTS_SETTING, "").split(","))):
        if host_name(entry) is None:
            raise SystemExit(
                f"{HOSTS_SETTING} entry {entry!r} must be a host name or address browsers use for the UI "
                "(e.g. em.facility.example), without scheme or port; separate several with ','"
            )
        names.append(entry)
    return names


def _option(argv: Sequence[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def install_guard(policy: Policy) -> None:
    """Every app ``dagster_webserver.cli`` builds from now on is wrapped by the guard."""
    import dagster_webserver.cli as cli

    from em_platform.web_guard.asgi import Guarded

    build = cli.create_app_from_workspace_process_context

    def guarded_app(*args, **kwargs):
        return Guarded(build(*args, **kwargs), policy)

    cli.create_app_from_workspace_process_context = guarded_app


def serve(argv: Sequence[str]) -> int:
    """``dagster-webserver`` with ``argv``, behind the guard."""
    import dagster_webserver.cli as cli

    bound = _option(argv, "-h", "--host") or "127.0.0.1"
    install_guard(Policy.for_hosts(web_hosts(os.environ, bound)))
    sys.argv = ["dagster-webserver", *argv]
    cli.main()
    return 0


def dev(argv: Sequence[str]) -> int:
    """``dagster dev`` with ``argv``, whose webserver process is this module's."""
    import dagster._cli.dev as dagster_dev

    start = dagster_dev.open_ipc_subprocess

    def open_subprocess(parts, *args, **kwargs):
        if list(parts[1:3]) == ["-m", "dagster_webserver"]:
            parts = [parts[0], "-m", "em_platform.webserver", *parts[3:]]
        return start(parts, *args, **kwargs)

    dagster_dev.open_ipc_subprocess = open_subprocess
    # Dagster 1.13 says `dagster dev` is superseded by `dg dev`, which serves a dg project; this repository is
    # a plain code location, so `dagster dev` is still what serves it and the warning cannot be acted on.
    warnings.filterwarnings("ignore", "Function `dev_command` is superseded", FutureWarning)
    dagster_dev.dev_command.main(list(argv), prog_name="dagster dev")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["dev"]:
        return dev(args[1:])
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
