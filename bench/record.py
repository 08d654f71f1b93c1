"""How a benchmark records its result: bench/results/<name>.json with the machine's core count and the date."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, result: dict) -> dict:
    """Write ``result`` (plus ``cpus`` and ``date``) to bench/results/``name``.json and print it."""
    result = {**result, "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
