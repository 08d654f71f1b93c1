"""The retention settings: days, or forever; anything else is refused naming the variable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from em_platform.deploy.services import platform_env
from em_platform.retention.policy import FOREVER, SETTINGS, RetentionError, RetentionPolicy
from tests.support.browser import REPO


def test_defaults_days_and_forever():
    assert RetentionPolicy.from_env({}) == RetentionPolicy(14, 90, 90, 14, 14, FOREVER)
    policy = RetentionPolicy.from_env({"EM_RETAIN_JOURNAL_DAYS": "30", "EM_RETAIN_RUNS_DAYS": "forever"})
    assert (policy.journal_days, policy.runs_days) == (30, FOREVER)
    now = datetime(2027, 1, 31, tzinfo=UTC)
    assert policy.cutoff(policy.journal_days, now) == now - timedelta(days=30)
    assert policy.cutoff(policy.runs_days, now) is None  # kept for ever: nothing is let go


@pytest.mark.parametrize("value", ["0", "-3", "0.5", "never", "nan", "inf"])
def test_a_value_that_is_no_number_of_days_is_refused_naming_the_variable(value):
    with pytest.raises(RetentionError, match="EM_RETAIN_DEAD_LETTERS_DAYS"):
        RetentionPolicy.from_env({"EM_RETAIN_DEAD_LETTERS_DAYS": value})


@pytest.mark.parametrize("name", [name for name, _ in SETTINGS.values()])
def test_every_setting_reaches_the_containers_and_is_documented(name):
    assert name in platform_env()  # compose's services and the run containers (tests/deploy/test_compose.py)
    for page in ("docs/settings.md", "docs/retention.md", "docker/.env.example"):
        assert name in (REPO / page).read_text(), f"{name} not in {page}"
