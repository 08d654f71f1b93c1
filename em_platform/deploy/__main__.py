"""``python -m em_platform.deploy``: generate docker/compose.yaml; run the same topology as local processes.

compose [--check]      write docker/compose.yaml (and compose.standin.yaml) from the tables (--check: fail if stale)
images                 build the images (from a Debian base made here where no registry answers)
compose-up             docker/compose.yaml up as containers (Docker, or podman with its API service)
compose-down [--volumes]  remove the stack's containers (runs included); volumes kept unless --volumes
compose-status         each container of the stack and of its runs, with its health checked now
ui-user NAME           add a user who may log in to the UI and the viewer, or change its password
compose-ca [--broker]  the root certificate of the proxy's CA (browsers), or of the broker's (microscope PCs)
up [--state DIR]       start every service on loopback (PostgreSQL/RabbitMQ: the machine's), until Ctrl-C
down [--state DIR]     stop what an `up` in another shell started (by the PIDs it recorded)
plan [--state DIR]     print each process's command and environment (what `up` would run); changes nothing
status [--state DIR]   what runs where: each service's address, PIDs and whether they are alive (exit 3 if not)

Ports are stable (EM_WEB_PORT 3000, EM_CODE_SERVER_PORT 4000, EM_DASK_SCHEDULER_PORT 8786, EM_S3_PORT 9000);
PostgreSQL and RabbitMQ are found through PGHOST/PGPORT/PGUSER/PGPASSWORD and EM_BROKER (host:port),
EM_BROKER_USERNAME/EM_BROKER_PASSWORD. A service that dies is restarted by the runner (backoff 1 s, doubling).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from em_platform.deploy.compose import COMPOSE_FILE, compose_yaml
from em_platform.deploy.monitoring import COMPOSE_CONFIG as COMPOSE_PROMETHEUS
from em_platform.deploy.services import SERVICES

CONTAINER_COMMANDS = ("compose-up", "compose-down", "compose-status", "ui-user", "compose-ca")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "images":
        from em_platform.deploy.images import main as images

        return images(argv[1:])
    if argv and argv[0] in CONTAINER_COMMANDS:
        from em_platform.deploy.stack import main as stack

        return stack(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="python -m em_platform.deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    compose = sub.add_parser("compose", help="write docker/compose.yaml from the service table")
    compose.add_argument(
        "--check", action="store_true", help="exit 1 if docker/compose.yaml is not up to date"
    )
    for name, text in (
        ("up", "start the process topology"),
        ("down", "stop it"),
        ("plan", "print it"),
        ("status", "what runs where"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--state", type=Path, default=Path("var/deploy"), help="state folder (default var/deploy)"
        )
        p.add_argument("--name", default="em_deploy", help="prefix of its databases, bucket and topics")
        p.add_argument("--workers", type=int, default=2, help="Dask workers (default 2)")
    args = parser.parse_args(argv)

    if args.command == "compose":
        from em_platform.deploy.compose import compose_prometheus
        from em_platform.deploy.standins import STANDIN_FILE, standin_yaml

        generated = (
            (COMPOSE_FILE, compose_yaml()),
            (STANDIN_FILE, standin_yaml()),
            (COMPOSE_PROMETHEUS, compose_prometheus()),
        )
        if args.check:
            for path, text in generated:
                if not path.exists() or path.read_text() != text:
                    print(f"{path} is stale: run `python -m em_platform.deploy compose`", file=sys.stderr)
                    return 1
            print(f"{', '.join(str(p) for p, _ in generated)} match the tables")
            return 0
        for path, text in generated:
            path.write_text(text)
            print(path)
        return 0

    from em_platform.deploy.processes import (
        Machine,
        ProcessTopology,
        TopologyError,
        stable_ports,
        status,
        stop_from_pid_file,
    )

    if args.command == "down":
        pids = stop_from_pid_file(args.state)
        print(f"stopped {len(pids)} process group(s): {', '.join(map(str, pids)) or 'none running'}")
        return 0
    if args.command == "status":
        rows = status(args.state)
        if not rows:
            print(f"no topology running from {args.state}")
            return 1
        for name, address, pids, alive in rows:
            print(
                f"{name:<16} {address or '-':<22} pids {','.join(map(str, pids)):<14} {'up' if alive else 'DOWN'}"
            )
        return 0 if all(alive for *_, alive in rows) else 3
    try:
        topology = ProcessTopology(
            args.state,
            name=args.name,
            workers=args.workers,
            machine=Machine.from_env(),
            ports=stable_ports(check_free=args.command == "up"),
            # where Alertmanager sends the alerts (a pager's or a chat's webhook)
            settings={k: os.environ[k] for k in ("EM_ALERT_WEBHOOK",) if os.environ.get(k)},
        )
    except TopologyError as exc:
        print(f"deploy {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.command == "plan":
        for launch in topology.plan():
            print(f"# {launch.label} (cwd {launch.cwd})")
            print(" ".join(launch.argv))
            for k, v in sorted(launch.env.items()):
                print(f"  {k}={v}")
        return 0
    # The handler only appends to a list: setting a threading.Event from it deadlocks when the signal lands
    # while the main thread is inside that Event's own wait (the handler then waits for a lock its own
    # thread holds; seen as `make deploy-local` ignoring SIGTERM).
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    try:
        topology.start()
    except TopologyError as exc:
        print(f"deploy-local: {exc}", file=sys.stderr)
        return 1
    print(f"em_platform topology up (state and logs in {topology.state}):")
    print(f"  Dagster UI        {topology.webserver}")
    print(f"  Dask scheduler    {topology.scheduler} ({args.workers} workers)")
    print(
        f"  S3 (s3rver)       {topology.url('minio')}  bucket {topology.settings['EM_S3_BUCKET']}, objects in {topology.object_store_dir}"
    )
    print(f"  catalog           {topology.catalog_url}")
    print(f"  inbox             {topology.platform_env['EM_INBOX']}")
    print(
        f"  scope share(s)    {topology.platform_env['EM_SCOPE_SHARES']} (EM_SCOPE_SHARES: scope-sim --out, the "
        "scopes' tile folders)"
    )
    print(
        f"  STOMP broker      {topology.platform_env['EM_BROKER']} (topics {topology.settings['EM_BROKER_TOPIC_PREFIX']})"
    )
    metrics = ", ".join(f"{s.name} {topology.url(s.metrics_at)}{s.metrics}" for s in SERVICES if s.metrics)
    print(f"  metrics           {metrics}")
    prometheus = f"{topology.url('prometheus')}/prometheus"
    print(f"  Prometheus        {prometheus}/ (the facility's page: {prometheus}/consoles/facility.html)")
    webhook = topology.settings.get("EM_ALERT_WEBHOOK") or "none: set EM_ALERT_WEBHOOK to page someone"
    print(f"  Alertmanager      {topology.url('alertmanager')} (alerts to: {webhook})")
    print("Ctrl-C stops every service.", flush=True)
    try:
        # Short sleeps: the kernel may hand SIGTERM to another thread (s3fs's IO loop); Python runs the
        # handler in the main thread the next time it returns to the interpreter.
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        topology.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
