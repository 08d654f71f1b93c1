"""How a benchmark records its result: bench/results/<name>.json with the machine's core count and the date."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def model_name() -> str:
    return cpu_fields().get("model name", "")


def processor() -> str:
    """The CPU's model name with its family and model numbers: cloud hosts all call themselves "AMD EPYC"."""
    fields = cpu_fields()
    if not fields:
        return ""
    return f"{fields.get('model name', '')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def history_stamp() -> dict:
    """What every history entry starts with: when, on which CPU, under what load."""
    return {
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": processor(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def record(name: str, result: dict) -> dict:
    """Write ``result`` (plus ``cpus`` and ``date``) to bench/results/``name``.json and print it."""
    result = {**result, "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
