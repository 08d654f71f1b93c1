"""The ``em-platform`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="em-platform", description="em_platform: EM facility data on Dagster"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="write samples to the inbox, ingest them through Dagster, print the catalog")
    samples = sub.add_parser("samples", help="write the sample volumes into a folder (default: the inbox)")
    samples.add_argument("folder", nargs="?", type=Path)
    sub.add_parser("settings", help="print the effective settings (from EM_* variables)")
    from em_platform.tem import listen_cli

    listen_cli.add_arguments(
        sub.add_parser("listen", help="journal the microscope's STOMP messages (tile.raw, montage.*)")
    )
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
    args = parser.parse_args(argv)

    from em_platform.settings import ConfigError, load_settings

    try:
        if args.command == "demo":
            from em_platform.demo import run_demo

            return run_demo()
        if args.command == "samples":
            from em_platform.samples import write_samples

            folder = args.folder or Path(load_settings().inbox)
            for p in write_samples(folder):
                print(p)
            return 0
        if args.command == "listen":
            from em_platform.tem.journal import Journal

            return listen_cli.run(args, lambda: Journal(load_settings().catalog_url))
        if args.command == "scope-sim":
            return _scope_sim(args, load_settings())
        if args.command == "settings":
            for k, v in vars(load_settings()).items():
                print(f"{k} = {v}")
            return 0
    except ConfigError as exc:
        print(f"em-platform: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


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
    broker = args.broker or settings.broker
    if broker:
        from em_platform.tem.protocol import BrokerPublisher, parse_broker

        with BrokerPublisher(*parse_broker(broker)) as publisher:
            return scope_cli.run(args, publisher.publish)
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url)
    try:
        return scope_cli.run(args, journal.record)
    finally:
        journal.dispose()


if __name__ == "__main__":
    sys.exit(main())
