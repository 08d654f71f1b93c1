"""A real single-node SLURM (tests/support/slurm.py) for the whole session: munged, slurmctld and slurmd of the
tests' own, in a temporary folder. Skipped, saying why, where SLURM is not installed or we are not root."""

from __future__ import annotations

import pytest

from tests.support.slurm import LocalSlurm, is_available


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A started LocalSlurm whose node is idle; stopped (no daemon, no job process left) after the session."""
    ok, reason = is_available()
    if not ok:
        print(f"SLURM tests skipped: {reason}")
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        print(f"SLURM {cluster.cluster}: node {cluster.node} idle {cluster.started_in:.2f} s after start")
        yield cluster
