"""Fetch em_stitch 0.3.4's source distribution and unpack its integration-test data into var/em_stitch.

The data are a real Allen TEMCA montage (``montage_example``: the scope's metafile for 4,969 tiles with its
own matcher point pairs) and a 3 × 3 lens-calibration montage (``lens_example``: metafile and render
point-match collection), BSD-2 licensed by the Allen Institute. They are not committed: ``make`` fetches
them at set-up with pip (the package index the machine is configured for) and checks the sdist's SHA-256.
The stitching tests and ``bench/bench_temca.py`` read them from here.

    .venv/bin/python scripts/fetch_em_stitch.py      # idempotent; exit 1 with the reason when it cannot
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.4"
SHA256 = "853d92aef1768204e32bcda9d8c60666205ed01e1b8127755ce44f94235e5901"
TARGET = Path(__file__).resolve().parents[1] / "var" / "em_stitch"
MEMBERS = "integration_tests/test_files/"


def fetch(target: Path = TARGET) -> Path:
    """``target`` holding the sdist's test files and its LICENSE (already there: nothing is downloaded)."""
    if (target / "COMPLETE").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
             f"em-stitch=={VERSION}", "-d", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        sdists = list(Path(tmp).glob(f"em_stitch-{VERSION}.tar.gz"))
        if run.returncode or not sdists:
            raise SystemExit(
                f"fetch_em_stitch: pip could not download em-stitch=={VERSION} (its sdist holds the real TEMCA "
                f"test data): {run.stderr.strip()[-500:] or 'no file'}"
            )
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(
                f"fetch_em_stitch: {sdists[0].name} has SHA-256 {digest}, expected {SHA256}: not the published "
                "file; check the package index pip uses"
            )
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        prefix = f"em_stitch-{VERSION}/"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.isfile() and (name.startswith(MEMBERS) or name == "LICENSE"):
                    member.name = name.removeprefix(MEMBERS)
                    tar.extract(member, staging, filter="data")
        (staging / "COMPLETE").write_text(f"em_stitch {VERSION} sdist, SHA-256 {SHA256}\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # whole or not at all
    return target


if __name__ == "__main__":
    print(f"em_stitch {VERSION} test data in {fetch()}")
