"""Prometheus's and Alertmanager's configuration for a topology: what to scrape (each service's metrics
address), the alert rules (``docker/prometheus/alerts.yml``), where alerts go. Written by whatever starts
them (the operations suite, ``make deploy-local``); Debian's ``prometheus`` and ``prometheus-alertmanager``
run them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RULES = Path(__file__).resolve().parents[2] / "docker" / "prometheus" / "alerts.yml"


def prometheus_config(
    targets: Mapping[str, Sequence[str]],
    alertmanager: str,
    *,
    rules: Path = RULES,
    interval_s: float = 15.0,
) -> dict[str, Any]:
    """Scrape ``targets`` (job -> ``HOST:PORT`` list) every ``interval_s``, evaluate ``rules`` as often, and
    send alerts to the Alertmanager at ``alertmanager`` (``HOST:PORT``)."""
    every = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
            for job, addresses in sorted(targets.items())
        ],
    }


def alertmanager_config(
    webhook: str, *, group_wait_s: float = 30.0, group_interval_s: float = 300.0
) -> dict[str, Any]:
    """Every alert to the webhook receiver at URL ``webhook`` (a pager's, a chat's), resolved ones too, grouped
    by alert name and scope; ``group_wait_s`` and ``group_interval_s`` are Alertmanager's (its defaults
    30 s and 5 min: a first alert waits that long for others of its group)."""
    return {
        "route": {
            "receiver": "operators",
            "group_by": ["alertname", "scope", "job"],
            "group_wait": f"{group_wait_s:g}s",
            "group_interval": f"{group_interval_s:g}s",
            "repeat_interval": "4h",
        },
        "receivers": [{"name": "operators", "webhook_configs": [{"url": webhook, "send_resolved": True}]}],
    }
