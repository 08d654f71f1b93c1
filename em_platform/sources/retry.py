"""Retries with exponential backoff, and the line between a transient fault and a permanent one.

A transient fault (connection reset, timeout, HTTP 408/425/429/5xx, FTP 4xx) is retried; a permanent one
(HTTP 404 and other 4xx, FTP 5xx, a checksum mismatch) is raised at once with the URL in the message,
because trying again cannot help and the user has to fix a setting or tell the source's maintainers.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class SourceError(RuntimeError):
    """A source could not deliver a dataset; the message names the URL and what to do."""

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(message)
        self.url = url


class TransientSourceError(SourceError):
    """Worth another try: the network or the server had a bad moment."""


class PermanentSourceError(SourceError):
    """Another try cannot help (missing file, refused request, wrong checksum)."""


class ChecksumMismatch(PermanentSourceError):
    """The bytes received are not the bytes the source published."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries, including the first
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2  # ± fraction of each delay, so parallel workers do not retry in lockstep

    def delay(self, failures: int) -> float:
        d = min(self.max_delay_s, self.base_delay_s * self.factor ** max(0, failures - 1))
        return max(0.0, d * (1 + random.uniform(-self.jitter, self.jitter)))


def http_error(status: int, url: str, reason: str = "") -> SourceError:
    """The SourceError for an HTTP status: transient for 408/425/429/5xx, permanent otherwise."""
    what = f"HTTP {status}{' ' + reason if reason else ''} from {url}"
    if status in TRANSIENT_HTTP or status >= 500:
        return TransientSourceError(f"{what} (the server is busy or failing; retried)", url=url)
    if status == 404:
        return PermanentSourceError(
            f"{what}: no such file or entry; check the dataset id and the endpoint URL in the run config",
            url=url,
        )
    return PermanentSourceError(f"{what}; check the endpoint URL and credentials in the run config", url=url)


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy = RetryPolicy(),
    transient: Callable[[BaseException], bool] | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient faults with exponential backoff.

    ``transient(exc)`` decides which exceptions are worth another try (default: TransientSourceError and
    OSError, which covers connection resets and timeouts). The last failure is raised, with ``what``
    and the number of tries in its message when they were all used up.
    """
    is_transient = transient or (
        lambda e: isinstance(e, TransientSourceError | OSError) and not isinstance(e, PermanentSourceError)
    )
    failures = 0
    while True:
        try:
            return fn()
        except BaseException as exc:
            if not isinstance(exc, Exception) or not is_transient(exc):
                raise
            failures += 1
            if failures >= policy.attempts:
                if no_network(exc):
                    raise TransientSourceError(
                        f"no network: {what} could not resolve the source's host name in {failures} tries "
                        f"({type(exc).__name__}: {exc}). The public sources need the internet; offline, ingest "
                        "files through the inbox instead (docs/ingests.md)",
                        url=getattr(exc, "url", None),
                    ) from exc
                raise TransientSourceError(
                    f"{what}: still failing after {failures} tries ({type(exc).__name__}: {exc}); "
                    "the source may be down, try again later",
                    url=getattr(exc, "url", None),
                ) from exc
            delay = policy.delay(failures)
            logger.warning(
                "%s failed (%s: %s); try %d of %d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                failures + 1,
                policy.attempts,
                delay,
            )
            sleep(delay)


_NO_NAME = (
    "Name or service not known",
    "Temporary failure in name resolution",
    "No address associated with hostname",
    "nodename nor servname provided",
    "NameResolutionError",
    "Could not resolve host",
)


def no_network(exc: BaseException) -> bool:
    """Whether a failure is a host name that did not resolve (offline, or no DNS), anywhere in its chain:
    urllib's URLError, requests' and aiohttp's connection errors all carry the resolver's error inside."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror) or any(text in str(e) for text in _NO_NAME):
            return True
        todo += [
            x
            for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
            if isinstance(x, BaseException)
        ]
    return False
