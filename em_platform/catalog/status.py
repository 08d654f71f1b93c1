"""The status machine of a dataset record (macroscope's states, with the transitions enforced)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SAVING_DATA = "saving-data"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


# complete → pending re-ingests a source that changed; failed/cancelled → pending is a retry.
ALLOWED: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.PROCESSING, Status.FAILED, Status.CANCELLED}),
    Status.PROCESSING: frozenset({Status.SAVING_DATA, Status.FAILED, Status.CANCELLED}),
    Status.SAVING_DATA: frozenset({Status.COMPLETE, Status.FAILED, Status.CANCELLED}),
    Status.COMPLETE: frozenset({Status.PENDING}),
    Status.FAILED: frozenset({Status.PENDING, Status.CANCELLED}),
    Status.CANCELLED: frozenset({Status.PENDING}),
}

# A record in one of these states belongs to a run that is (or was) working on it.
IN_FLIGHT = frozenset({Status.PROCESSING, Status.SAVING_DATA})
# ... and pending ones too: begun by a run that has not started the work yet (a run that dies there
# leaves a record that must say so).
OWNED_BY_A_RUN = IN_FLIGHT | {Status.PENDING}


class IllegalTransition(ValueError):
    """A status change the machine does not allow."""


def check_transition(current: Status | str, new: Status | str) -> Status:
    """Return ``new`` as a Status, or raise IllegalTransition naming both states and the legal ones."""
    cur, nxt = Status(current), Status(new)
    if nxt not in ALLOWED[cur]:
        legal = ", ".join(sorted(s.value for s in ALLOWED[cur]))
        raise IllegalTransition(
            f"a record cannot go from {cur.value!r} to {nxt.value!r}; from {cur.value!r} it may go to: {legal}"
        )
    return nxt
