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
        if args.command == "settings":
            for k, v in vars(load_settings()).items():
                print(f"{k} = {v}")
            return 0
    except ConfigError as exc:
        print(f"em-platform: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
