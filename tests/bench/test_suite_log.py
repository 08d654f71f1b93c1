"""bench_suite reads the counts and times of a suite's log as pytest and .ci/run print them."""

from bench.bench_suite import parse_log

LOG = """\
== make test (05:41:12 UTC)
.venv/bin/python -m pytest -q -n 3 --durations=40 tests
1 failed, 1653 passed, 1 skipped, 4 warnings in 637.43s (0:10:37)
make: *** [Makefile:55: test] Error 1
   make test: 720 s, exit 2
== make test-e2e (05:53:12 UTC)
======================= 39 passed in 671.20s (0:11:11) ========================
   make test-e2e: 690 s, exit 0
== .ci/run's targets, wall time:
   make test: 720 s, exit 2
"""


def test_the_pytest_summaries_and_cis_targets_are_read():
    parsed = parse_log(LOG)
    assert parsed["pytest"] == [
        {"counts": {"failed": 1, "passed": 1653, "skipped": 1, "warnings": 4}, "seconds": 637.43},
        {"counts": {"passed": 39}, "seconds": 671.2},
    ]
    assert parsed["ci_targets"] == {
        "test": {"seconds": 720, "exit": 2},
        "test-e2e": {"seconds": 690, "exit": 0},
    }


def test_a_log_without_a_summary_gives_none():
    assert parse_log("make: *** No rule to make target 'tset'.  Stop.\n") == {"pytest": [], "ci_targets": {}}
