"""The ``em-platform`` command."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="em-platform", description="em_platform: EM facility data on Dagster"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="write samples to the inbox, ingest them through Dagster, print the catalog")
    samples = sub.add_parser("samples", help="write the sample volumes into a folder (default: the inbox)")
    samples.add_argument("folder", nargs="?", type=Path)
    settings = sub.add_parser(
        "settings",
        help="print the effective settings (EM_* variables, DAGSTER_HOME) and where each comes from",
    )
    settings.add_argument(
        "--export",
        action="store_true",
        help="print `export DAGSTER_HOME=... EM_DATA_ROOT=...` for the shell (eval it before `dagster` "
        "commands) and create the Dagster home with the project's dagster.yaml if needed",
    )
    dev = sub.add_parser(
        "dev",
        help="the Dagster UI and daemon (dagster dev) on this checkout's workspace; stops cleanly on SIGTERM",
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.add_argument("--workspace", type=Path, default=None, help="default: the checkout's workspace.yaml")
    viewer = sub.add_parser(
        "viewer",
        help="Neuroglancer and the data root's OME-Zarr images over HTTP (the images' 'neuroglancer' links)",
    )
    viewer.add_argument("--host", default=None, help="default: EM_VIEWER_URL's host (loopback by default)")
    viewer.add_argument("--port", type=int, default=None, help="default: EM_VIEWER_URL's port (3030)")
    door = sub.add_parser(
        "door",
        help="the TLS proxy's login and request guard (its forward_auth): users, failed-login bound, no "
        "cross-site control",
    )
    door.add_argument("--users", type=Path, required=True, help="the users file (`deploy ui-user` writes it)")
    door.add_argument("--host", default="127.0.0.1")
    door.add_argument("--port", type=int, default=3100)
    from em_platform.tem import listen_cli

    listen_cli.add_arguments(
        sub.add_parser("listen", help="journal the microscope's STOMP messages (tile.raw, montage.*)")
    )
    sub.add_parser(
        "live-qc",
        help="the warm live-QC service: judge live montages' tiles as they land (make dev and deploy-local "
        "start it)",
    )
    from em_platform import cryo_live_cli

    cryo_live_cli.add_arguments(
        sub.add_parser(
            "cryo-live",
            help="process each single-particle exposure of the cryo sessions as it lands: motion correction, "
            "CTF, curation (make dev and deploy-local start it)",
        )
    )
    sub.add_parser(
        "metrics",
        help="the facility's Prometheus exporter: montages being acquired, buffer, uploads, runs, SLURM "
        "(EM_METRICS, default 127.0.0.1:9472)",
    )
    from em_platform import dead_letters_cli

    dead_letters_cli.add_arguments(
        sub.add_parser(
            "dead-letters",
            help="list, replay or clear what the platform refused (bad ids, tiles off the scope shares, ...)",
        )
    )
    backfill = sub.add_parser(
        "backfill",
        help="re-run a partitioned job's assets over many partitions: one asset backfill the daemon carries out",
    )
    backfill.add_argument("job", help="the job, e.g. montage_job")
    given = backfill.add_mutually_exclusive_group(required=True)
    given.add_argument("--partitions", help="comma-separated partition keys")
    given.add_argument("--partitions-file", type=Path, help="a file of partition keys, one a line")
    from em_platform.simulation import scope_cli

    sim = sub.add_parser(
        "scope-sim", help="simulate a microscope acquiring a montage (the embedded default scope)"
    )
    scope_cli.add_arguments(sim)
    sim.add_argument(
        "--broker",
        metavar="HOST:PORT",
        default=None,
        help="publish to this STOMP broker instead of writing the journal (default: $EM_BROKER if set)",
    )
    from em_platform.stitch import stitch_cli

    stitch_cli.add_arguments(
        sub.add_parser(
            "stitch",
            help="stitch a folder of TIFF tiles laid out by a CSV into a fused OME-Zarr montage",
            description="Match every tile against its top and left grid neighbours (or read point matches), "
            "solve a transform per tile, write OUT.positions.csv, OUT.report.json, OUT.tilespecs.json and "
            "OUT.matches.json, and fuse the montage into a multiscale OME-Zarr at OUT. Exit 3 when content "
            "tiles could not be placed by the images or the montage is torn (see the report).",
        )
    )
    args = parser.parse_args(argv)

    from em_platform.settings import ConfigError, load_settings

    try:
        if args.command == "demo":
            from em_platform.demo import run_demo

            return run_demo()
        if args.command == "dev":
            return _dev(args, load_settings())
        if args.command == "viewer":
            return _viewer(args, load_settings())
        if args.command == "door":
            return _door(args, load_settings())
        if args.command == "samples":
            from em_platform.samples import write_samples

            folder = args.folder or Path(load_settings().inbox)
            for p in write_samples(folder):
                print(p)
            return 0
        if args.command == "listen":
            from em_platform.tem.journal import Journal

            s = load_settings()
            shares = tuple(str(Path(p).expanduser().resolve()) for p in args.share) or s.scope_shares
            return listen_cli.run(args, lambda: Journal(s.catalog_url, tile_shares=shares))
        if args.command == "live-qc":
            from em_platform import live_qc_cli

            return live_qc_cli.run(load_settings())
        if args.command == "cryo-live":
            return cryo_live_cli.run(args, load_settings())
        if args.command == "metrics":
            from em_platform import metrics_cli

            return metrics_cli.run(load_settings())
        if args.command == "dead-letters":
            s = load_settings()
            return dead_letters_cli.run(args, s.catalog_url, s.scope_shares)
        if args.command == "scope-sim":
            return _scope_sim(args, load_settings())
        if args.command == "stitch":
            return stitch_cli.run(args)
        if args.command == "backfill":
            return _backfill(args, load_settings())
        if args.command == "settings":
            return _settings(load_settings(), export=args.export)
    except ConfigError as exc:
        print(f"em-platform: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


def _dev(args, settings) -> int:
    import os

    from em_platform.dev import run_dev
    from em_platform.settings import ENV_NAMES, ensure_dagster_home, project_dir

    workspace = args.workspace or (project_dir() or Path.cwd()) / "workspace.yaml"
    if not workspace.is_file():
        print(f"em-platform dev: no workspace file {workspace}; give --workspace", file=sys.stderr)
        return 2
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(settings.dagster_home))  # the one home (settings)
    # Dagster's processes run in the Dagster home, the services here: a folder set as a relative path is
    # handed on as the one it means here, so every process reads the same folder
    for key, name in ENV_NAMES.items():
        raw, value = os.environ.get(name, "").strip(), getattr(settings, key, None)
        relative = raw and "://" not in raw and not Path(raw).expanduser().is_absolute()
        if relative and isinstance(value, str) and Path(value).is_absolute():
            os.environ[name] = value
    return run_dev(str(workspace), args.host, args.port)


def _backfill(args, settings) -> int:
    """One asset backfill over the partitions given, on the instance of DAGSTER_HOME (em_platform.backfill)."""
    import os

    import dagster as dg

    from em_platform.backfill import BackfillRefused, launch_asset_backfill
    from em_platform.settings import ensure_dagster_home

    if args.partitions_file is not None:
        try:
            keys = args.partitions_file.read_text().split()
        except OSError as exc:
            print(
                f"em-platform backfill: cannot read {args.partitions_file}: {exc.strerror}", file=sys.stderr
            )
            return 2
    else:
        keys = args.partitions.split(",")
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home(settings.dagster_home))
    from em_platform.definitions import defs

    with dg.DagsterInstance.get() as instance:
        try:
            backfill_id = launch_asset_backfill(instance, defs, args.job, keys)
        except BackfillRefused as exc:
            print(f"em-platform backfill: {exc}", file=sys.stderr)
            return 2
    print(f"backfill {backfill_id}: {args.job} over {len({k.strip() for k in keys if k.strip()})} partition(s); the daemon launches its runs "
          "(the UI: Overview, Backfills)")  # fmt: skip
    return 0


def _settings(settings, export: bool) -> int:
    """Every setting under its environment variable, marked (default) when the variable is unset."""
    import os
    import shlex

    from em_platform.settings import ENV_NAMES, ensure_dagster_home, project_dir

    if export:
        ensure_dagster_home(settings.dagster_home)
        pairs = {"DAGSTER_HOME": settings.dagster_home, "EM_DATA_ROOT": settings.data_root}
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in pairs.items()))
        return 0
    values = {ENV_NAMES.get(k, k): v for k, v in vars(settings).items()}
    width = max(map(len, values))
    for name, value in values.items():
        origin = "" if os.environ.get(name, "").strip() else "  (default)"
        value = os.pathsep.join(value) if isinstance(value, tuple) else value
        print(f"{name:<{width}} = " + ("(unset)" if value is None else f"{value}{origin}"))
    root = project_dir()
    where = f"this checkout ({root}/var)" if root else "~/.em_platform"
    print(
        f"\nUnset paths default to {where} for make, this CLI and `dagster` commands alike.\n"
        'Before `dagster` commands: eval "$(.venv/bin/em-platform settings --export)"'
    )
    return 0


def _viewer(args, settings) -> int:
    """Serve Neuroglancer and the images where EM_VIEWER_URL says browsers find them, to the host names
    browsers use for it (loopback, EM_VIEWER_URL's, EM_VIEWER_HOSTS)."""
    from urllib.parse import urlsplit

    from em_platform.viewer.server import serve

    where = urlsplit(settings.viewer_url)
    host = args.host or where.hostname
    port = args.port if args.port is not None else (where.port or (443 if where.scheme == "https" else 80))
    return serve(
        settings.data_root, host, port, settings.storage_options or None, allowed_hosts=settings.viewer_hosts
    )


def _door(args, settings) -> int:
    """The door for the UI (EM_WEB_HOSTS; JSON bodies only) and the viewer (its host names)."""
    import os

    from em_platform.web_guard.door import serve
    from em_platform.web_guard.rules import Policy
    from em_platform.webserver import web_hosts

    sites = {
        "ui": Policy.for_hosts(web_hosts(os.environ, None)),
        "viewer": Policy.for_hosts(settings.viewer_hosts, json_bodies=False),
    }
    return serve(args.users, sites, args.host, args.port)


def _scope_sim(args, settings) -> int:
    """Run the simulated scope, its messages going to the broker or straight into the journal."""
    from em_platform.simulation import scope_cli

    if args.out is None:
        if "://" in settings.data_root:
            print(
                "em-platform scope-sim: give --out DIR (tiles are files the processing must read)",
                file=sys.stderr,
            )
            return 2
        args.out = Path(settings.data_root) / "scope"
    from em_platform.edge import MONTAGE_ID, Refused, under_shares

    try:  # what the platform would refuse from this scope is refused here, before any tile is written
        args.montage_id = MONTAGE_ID.check(args.montage_id or str(uuid.uuid4()), "--montage-id")
        announced = args.share_as if args.share_as is not None else Path(args.out).resolve()
        under_shares(
            str(announced / args.montage_id),
            settings.scope_shares,
            "--share-as" if args.share_as else "--out",
        )
    except Refused as exc:
        print(f"em-platform scope-sim: {exc}", file=sys.stderr)
        return 2
    broker = args.broker or settings.broker
    if broker:
        from em_platform.simulation.verdicts import VerdictWatch
        from em_platform.tem.broker import BrokerSettings, destination
        from em_platform.tem.protocol import CONSUMED

        if not args.verdict_timeout > 0:
            print("em-platform scope-sim: --verdict-timeout must be > 0 seconds", file=sys.stderr)
            return 2
        heard: list[tuple[str, str | None]] = []  # the qc.status verdicts, newest last
        try:
            stomp = BrokerSettings.from_env(broker=broker)
        except ValueError as exc:  # BrokerSpecError: the address or EM_BROKER_TLS
            print(f"em-platform scope-sim: {exc}", file=sys.stderr)
            return 2
        assert stomp is not None  # a broker is given: from_env is None only without one
        watch = VerdictWatch(args.verdict_timeout)
        topics = ", ".join(destination(t, stomp.topic_prefix) for t in CONSUMED)
        where = (
            f"on {stomp.address} (topics {topics}; verdicts on {destination('qc.tile', stomp.topic_prefix)})"
        )
        with stomp.publisher() as publisher:
            publisher.subscribe("qc.status", lambda msg: heard.append((msg.status, msg.reason)))
            publisher.subscribe("qc.tile", lambda msg: watch.heard(msg.tile_id))
            return scope_cli.run(args, publisher.publish, lambda: heard[-1] if heard else None, watch, where)
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url, tile_shares=settings.scope_shares)
    montage_id = args.montage_id

    def latest_qc():
        statuses = journal.qc_statuses(montage_id)
        return statuses[-1] if statuses else None

    try:
        return scope_cli.run(args, journal.record, latest_qc)
    finally:
        journal.dispose()


if __name__ == "__main__":
    sys.exit(main())
