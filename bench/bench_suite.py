"""How long the test suites take from a fresh clone on this host: ``make <target>`` in a new clone of this
checkout's HEAD, set-up included, as CI runs it. The figures and hosts go to bench/results/suite.json (a
history), not into prose: the README gives the range and points here.

The host's core speed is taken before the run (OpenCV's CLAHE on a 5000² tile, bench_tiles.opencv_clahe_ms):
hosts of one kind differ 2-3x, and a suite's time is read against it.

python -m bench.bench_suite                   # make test from a fresh clone (about 6-12 min on 2 cores)
python -m bench.bench_suite --target ci       # .ci/run, every target CI runs (about 40-60 min)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.record import RESULTS, history_stamp

NAME = "suite"
REPO = Path(__file__).resolve().parents[1]
# pytest's last line: "1 failed, 1653 passed, 1 skipped, 4 warnings in 637.43s (0:10:37)"
PYTEST_SUMMARY = re.compile(r"^=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in (?P<seconds>[\d.]+)s")
# .ci/run's summary: "   make test: 720 s, exit 2"
CI_TARGET = re.compile(r"^\s+make (?P<target>[\w-]+): (?P<seconds>\d+) s, exit (?P<status>\d+)$")
TARGET_S = {"test": 720, "ci": 3600}  # the project's limits: make test 12 min, .ci/run 60 min


def parse_log(text: str) -> dict:
    """The pytest summaries (counts and seconds, one per pytest run) and .ci/run's per-target times."""
    pytest_runs, targets = [], {}
    for line in text.splitlines():
        m = PYTEST_SUMMARY.match(line.strip())
        if m:
            counts = {w: int(n) for n, w in (c.split(" ", 1) for c in m["counts"].split(", "))}
            pytest_runs.append({"counts": counts, "seconds": float(m["seconds"])})
        m = CI_TARGET.match(line)
        if m:
            targets[m["target"]] = {"seconds": int(m["seconds"]), "exit": int(m["status"])}
    return {"pytest": pytest_runs, "ci_targets": targets}


def document(history: list[dict]) -> dict:
    """The results file: every run, and each target's latest (what docs/benchmarks.md shows)."""
    latest = {h["target"]: h for h in sorted(history, key=lambda h: h["measured"])}
    return {
        "benchmark": NAME,
        "date": max(h["measured"] for h in history),
        "latest": latest,
        "history": history,
    }


def run_fresh(target: str, log_path: Path) -> tuple[int, float, str]:
    """``make target`` (or .ci/run) in a new clone of HEAD: its exit status, wall seconds and log."""
    with tempfile.TemporaryDirectory(prefix="em_suite_") as tmp:
        clone = Path(tmp) / "em_platform"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        cmd = [".ci/run"] if target == "ci" else ["make", target]
        started = time.monotonic()
        with open(log_path, "w") as log:
            status = subprocess.run(cmd, cwd=clone, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - started
    return status, seconds, log_path.read_text(errors="replace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="test", help="a make target, or 'ci' for .ci/run (default test)")
    ap.add_argument("--log", type=Path, help="keep the run's output here (default: a temporary file)")
    ap.add_argument("--note", help="what else ran beside it: kept with the run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    from bench.bench_tiles import opencv_clahe_ms

    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    workers = os.environ.get("TEST_WORKERS", "the Makefile's")  # make's ?= takes it from the environment
    entry = {
        **history_stamp(),
        "target": args.target,
        "test_workers": workers,
        "commit": head,
        "opencv_clahe_5000_ms": opencv_clahe_ms(),
    }
    with tempfile.TemporaryDirectory(prefix="em_suite_log_") as tmp:
        log_path = args.log or Path(tmp) / "suite.log"
        status, seconds, text = run_fresh(args.target, log_path)
    entry |= {"exit": status, "seconds": round(seconds, 1), **parse_log(text)}
    if args.target in TARGET_S:
        entry["limit_s"] = TARGET_S[args.target]
        entry["within_limit"] = status == 0 and seconds <= TARGET_S[args.target]
    if args.note:
        entry["note"] = args.note
    print(json.dumps(entry, indent=1))
    if not args.no_record:
        path = RESULTS / f"{NAME}.json"
        history = json.loads(path.read_text())["history"] if path.exists() else []
        path.write_text(json.dumps(document([*history, entry]), indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
