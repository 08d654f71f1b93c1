"""The alert rules (docker/prometheus/alerts.yml): promtool's own unit tests of them pass, every alert has a
case where it fires and one where it stays quiet, and a runbook line an operator can open."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "docker" / "prometheus"
PROMTOOL = shutil.which("promtool")


def _alerts() -> dict[str, dict]:
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule}


def test_promtool_checks_and_unit_tests_every_rule():
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian, as root: apt-get install prometheus; make ops-engine)")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet():
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load((RULES / "alerts.test.yml").read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    for name in _alerts():
        assert True in cases.get(name, []), f"{name}: no test where it fires"
        assert False in cases.get(name, []), f"{name}: no test where it stays quiet"


def test_every_alert_has_a_runbook_line_in_the_operations_page():
    page = (REPO / "docs" / "operations.md").read_text()
    headings = {
        h.lower(): body for h, body in re.findall(r"^### (\w+)\n\n(.+?)(?=\n### |\Z)", page, re.S | re.M)
    }
    for name, rule in _alerts().items():
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"
        assert len(headings.get(name.lower(), "")) > 80, f"{name}: no runbook section in docs/operations.md"
        assert rule["labels"]["severity"] in ("page", "ticket")
