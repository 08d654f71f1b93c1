"""em_stitch 0.3.4's integration-test data (a real TEMCA montage, a lens-calibration montage), fetched at
set-up into var/em_stitch by scripts/fetch_em_stitch.py; a test that needs them is skipped, saying how to
fetch them, when they are not there."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "var" / "em_stitch"
MONTAGE_METAFILE = DATA / "montage_example" / "_metadata_test_example.json"
LENS_EXAMPLE = DATA / "lens_example"


def em_stitch_data() -> Path:
    if not (DATA / "COMPLETE").is_file():
        pytest.skip(
            f"em_stitch's test data are not in {DATA}: run `.venv/bin/python scripts/fetch_em_stitch.py` "
            "(make test does; it needs the package index)"
        )
    return DATA
