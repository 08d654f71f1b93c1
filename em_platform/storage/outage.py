"""Is a failure a storage outage? Then it is worth retrying later; a bad file is not.

An object store that is down (restarting, unreachable, throttling) fails every write the same way for a
while and then works again: the run should wait and retry, and the record says so. A failure counts as an
outage when, right after it, the storage root does not answer (:meth:`DataStore.reachable`), or when the
error itself is the store asking to be retried later (HTTP 503 ``ServiceUnavailable``, ``SlowDown``, a
request timeout). A connection error alone is not enough: it may come from a public source being
fetched, whose own retries are in :mod:`em_platform.sources.retry`.
"""

from __future__ import annotations

from collections.abc import Iterator

from em_platform.storage.store import DataStore

# S3 error codes that mean "not now" (AWS's retryable ones, and what MinIO/moto send while starting)
_TRY_LATER = frozenset(
    {"ServiceUnavailable", "SlowDown", "RequestTimeout", "InternalError", "XMinioServerNotInitialized"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _asks_to_retry(exc: BaseException) -> str | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)  # botocore's ClientError: a dict with the S3 error
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code in _TRY_LATER:
            return f"the store answered {code}"
    return None


def storage_outage(exc: BaseException, store: DataStore) -> str | None:
    """Why ``exc`` is a storage outage (a sentence naming the store), or None when it is not one."""
    if why := _asks_to_retry(exc):
        return f"{store.url()}: {why}"
    if not store.reachable():
        return f"{store.url()} does not answer"
    return None
