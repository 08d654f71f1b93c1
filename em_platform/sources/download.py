"""Resumable, verified downloads over HTTP(S) and FTP, with retries and a per-dataset manifest.

A file streams into ``<dest>.part``; an interrupted transfer continues from the bytes already there
(HTTP ``Range``, FTP ``REST``), a big HTTP file comes in ``parallel`` ranged parts whose progress is
kept in ``<dest>.parts`` so finished parts survive a crash. The sha256 of the bytes as received is
checked against a published digest when there is one; only then is the file renamed into place and
entered in the manifest, so a re-run never fetches it again and never trusts a half-written one.

Sizes the server announces are claims (:mod:`em_platform.sources.bounds`): a ``Content-Length`` or FTP
``SIZE`` must be a whole number within ``max_file_bytes`` and match the source's listing, before any part is
planned or the file preallocated; a stream stops at the size announced (or the bound), and JSON bodies are
read up to :data:`~em_platform.sources.bounds.MAX_METADATA_BYTES`.
"""

from __future__ import annotations

import ftplib
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import unquote, urlparse

import requests

from em_platform.sources.arrival import Arrival
from em_platform.sources.bounds import MAX_FILE_BYTES, SizeRefused, checked_size, json_body
from em_platform.sources.manifest import DownloadManifest, ManifestEntry
from em_platform.sources.progress import Progress
from em_platform.sources.retry import (
    ChecksumMismatch,
    PermanentSourceError,
    RetryPolicy,
    TransientSourceError,
    http_error,
    retrying,
)
from em_platform.storage.checksums import StreamHash

if TYPE_CHECKING:
    from _hashlib import HASH

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
PART_MAP_SUFFIX = ".parts"
USER_AGENT = "em_platform (https://github.com/em-platform; public EM dataset ingest)"


@dataclass(frozen=True)
class RemoteFile:
    """What HEAD (HTTP) or SIZE + MDTM (FTP) says about a file."""

    url: str
    size_bytes: int | None
    etag: str | None
    last_modified: str | None
    accepts_ranges: bool

    def fingerprint(self) -> str:
        return f"size={self.size_bytes};etag={self.etag};modified={self.last_modified}"


@dataclass(frozen=True)
class DownloadOptions:
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    parallel: int = 4  # ranged parts in flight for one big HTTP file
    part_bytes: int = 64 * 2**20  # size of one ranged part
    chunk_bytes: int = 1 * 2**20  # read size while streaming
    # A first part arriving at least this fast means more connections cannot help (a LAN mirror): the
    # remaining parts then come one at a time. None: always ``parallel``.
    fast_link_bytes_per_s: float | None = 200e6
    timeout_s: tuple[float, float] = (10.0, 60.0)  # connect, read
    # a larger announced (or sent) file is refused (bounds.MAX_FILE_BYTES)
    max_file_bytes: int = MAX_FILE_BYTES


class _RangeIgnored(PermanentSourceError):
    """A ranged GET came back whole (HTTP 200) although HEAD advertised byte ranges."""


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https", "ftp"):
        raise PermanentSourceError(
            f"{url}: unsupported URL scheme {scheme!r}; use http(s):// or ftp://", url=url
        )
    return scheme


def _session(session: requests.Session | None) -> requests.Session:
    if session is not None:
        return session
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    return s


def is_transient(exc: BaseException) -> bool:
    """Network faults, timeouts, 5xx and FTP 4xx are worth another try; a PermanentSourceError is not."""
    if isinstance(exc, PermanentSourceError):
        return False
    return isinstance(
        exc,
        TransientSourceError
        | requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError
        | ftplib.error_temp
        | EOFError
        | OSError,
    )


# ----------------------------------------------------------------------------------------------------
# Metadata: stat, JSON, FTP listing


def stat_remote(
    url: str,
    *,
    options: DownloadOptions = DownloadOptions(),
    session: requests.Session | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> RemoteFile:
    """Size, ETag, modification time and Range support of a remote file (retried; 404 is permanent)."""
    if _scheme(url) == "ftp":
        return retrying(
            lambda: _ftp_stat(url, options),
            what=f"stat {url}",
            policy=options.policy,
            transient=is_transient,
            logger=logger,
        )
    s = _session(session)

    def head() -> RemoteFile:
        r = s.head(url, allow_redirects=True, timeout=options.timeout_s)
        if r.status_code >= 400:
            raise http_error(r.status_code, url, r.reason)
        length = r.headers.get("Content-Length")
        size = None
        if length is not None:
            size = checked_size(
                url, "Content-Length", length, options.max_file_bytes, setting="max_file_bytes"
            )
        return RemoteFile(
            url=url,
            size_bytes=size,
            etag=r.headers.get("ETag"),
            last_modified=r.headers.get("Last-Modified"),
            accepts_ranges=r.headers.get("Accept-Ranges", "").lower() == "bytes",
        )

    return retrying(head, what=f"HEAD {url}", policy=options.policy, transient=is_transient, logger=logger)


def get_json(
    url: str,
    *,
    options: DownloadOptions = DownloadOptions(),
    session: requests.Session | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> Any:
    """GET a JSON document (retried on 5xx and network faults; 4xx, bad JSON and a body over
    :data:`~em_platform.sources.bounds.MAX_METADATA_BYTES` are permanent, naming the URL)."""
    s = _session(session)

    def get() -> Any:
        with s.get(url, timeout=options.timeout_s, headers={"Accept": "application/json"}, stream=True) as r:
            if r.status_code >= 400:
                raise http_error(r.status_code, url, r.reason)
            return json_body(r, url)

    return retrying(get, what=f"GET {url}", policy=options.policy, transient=is_transient, logger=logger)


def _ftp_connect(url: str, options: DownloadOptions) -> tuple[ftplib.FTP, str]:
    u = urlparse(url)
    ftp = ftplib.FTP(timeout=options.timeout_s[1])
    ftp.connect(u.hostname or "", u.port or 21, timeout=options.timeout_s[0])
    ftp.login(unquote(u.username or "anonymous"), unquote(u.password or "anonymous@"))
    ftp.voidcmd("TYPE I")
    return ftp, unquote(u.path or "/")


def _ftp_permanent(exc: ftplib.error_perm, url: str) -> PermanentSourceError:
    return PermanentSourceError(
        f"FTP {url}: {exc}; check the dataset id and the archive URL in the run config", url=url
    )


def _ftp_stat(url: str, options: DownloadOptions) -> RemoteFile:
    ftp, path = _ftp_connect(url, options)
    try:
        try:
            size = ftp.size(path)
        except ftplib.error_perm as exc:
            raise _ftp_permanent(exc, url) from None
        if size is not None:
            size = checked_size(url, "SIZE", size, options.max_file_bytes, setting="max_file_bytes")
        try:
            modified = ftp.voidcmd(f"MDTM {path}").split()[-1]
        except ftplib.error_perm:
            modified = None
        return RemoteFile(url, size, None, modified, accepts_ranges=True)
    finally:
        _ftp_close(ftp)


def _ftp_close(ftp: ftplib.FTP) -> None:
    try:
        ftp.quit()
    except Exception:
        ftp.close()


def list_ftp(
    url: str,
    *,
    options: DownloadOptions = DownloadOptions(),
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> list[str]:
    """File names (not paths) in an ftp:// folder, sorted (retried)."""

    def nlst() -> list[str]:
        ftp, path = _ftp_connect(url, options)
        try:
            try:
                names = ftp.nlst(path)
            except ftplib.error_perm as exc:
                if str(exc).startswith("550 No files found"):
                    return []
                raise _ftp_permanent(exc, url) from None
        finally:
            _ftp_close(ftp)
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names} - {".", ".."})

    return retrying(nlst, what=f"NLST {url}", policy=options.policy, transient=is_transient, logger=logger)


# ----------------------------------------------------------------------------------------------------
# Download


def download(
    url: str,
    dest: Path,
    *,
    manifest: DownloadManifest,
    key: str | None = None,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    options: DownloadOptions = DownloadOptions(),
    session: requests.Session | None = None,
    progress: Progress | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
    arrival: Arrival | None = None,
) -> ManifestEntry:
    """Fetch ``url`` to ``dest`` unless the manifest already holds it; resume, retry, verify, record.

    With an ``arrival`` (:class:`~em_platform.sources.arrival.Arrival`), the complete prefix of the file is
    reported as it grows, so a reader can work on the bytes already there while the rest downloads.
    """
    dest = Path(dest)
    key = key or dest.name
    done = manifest.get(key)
    if done and dest.exists() and dest.stat().st_size == done.size_bytes and done.url == url:
        if progress:
            progress.add(done.size_bytes)
        if arrival:
            arrival.reached(done.size_bytes)
        return done
    scheme = _scheme(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    size: int | None  # the announced size while the bytes come; what arrived once they have
    if scheme == "ftp":
        size, digest = _ftp_download(url, part, expected_size, options, progress, logger, arrival)
    else:
        s = _session(session)
        remote = stat_remote(url, options=options, session=s, logger=logger)
        size = remote.size_bytes if remote.size_bytes is not None else expected_size
        if expected_size is not None and size is not None and size != expected_size:
            raise PermanentSourceError(
                f"{url} is {size} bytes but the source listed {expected_size}; the file changed at the source "
                "or the listing is stale: re-run to re-check",
                url=url,
            )
        if size is not None:  # the listing's size is a claim too
            size = checked_size(url, "size", size, options.max_file_bytes, setting="max_file_bytes")
        if size is not None and remote.accepts_ranges and options.parallel > 1 and size > options.part_bytes:
            counted = progress.done if progress else 0
            try:
                digest = _http_parallel(url, part, size, s, options, progress, logger, arrival)
            except _RangeIgnored:
                # Parts written so far may hold the file's start at the wrong offsets: begin again.
                logger.warning(
                    "%s advertises byte ranges but answered a Range request with the whole file; "
                    "downloading it again from the start in one stream",
                    url,
                )
                part.unlink(missing_ok=True)
                dest.with_name(dest.name + PART_MAP_SUFFIX).unlink(missing_ok=True)
                if progress:
                    progress.add(counted - progress.done)
                if arrival:
                    arrival.restart()
                digest = _http_stream(url, part, size, s, options, progress, logger, arrival)
        else:
            digest = _http_stream(url, part, size, s, options, progress, logger, arrival)
        size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise TransientSourceError(f"{url}: received {size} bytes, expected {expected_size}", url=url)
    if expected_sha256 and digest != expected_sha256.lower():
        part.unlink(missing_ok=True)
        dest.with_name(dest.name + PART_MAP_SUFFIX).unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{url}: sha256 of the bytes received is {digest}, but the source published {expected_sha256}; "
            "the download was discarded (a corrupt transfer or a changed file: re-run, and if it persists "
            "tell the source's maintainers)",
            url=url,
        )
    os.replace(part, dest)
    dest.with_name(dest.name + PART_MAP_SUFFIX).unlink(missing_ok=True)
    entry = ManifestEntry(key=key, url=url, size_bytes=size, sha256=digest)
    manifest.add(entry)
    logger.info("downloaded %s (%d bytes, sha256 %s…)", url, size, digest[:16])
    return entry


def _http_stream(
    url: str,
    part: Path,
    size: int | None,
    s: requests.Session,
    options: DownloadOptions,
    progress: Progress | None,
    logger: logging.Logger | logging.LoggerAdapter,
    arrival: Arrival | None = None,
) -> str:
    """One stream into ``part``, continuing from its current length; returns the sha256 of the whole file.

    A server sending more than it announced (or than ``max_file_bytes`` when it announced nothing) is
    refused as soon as the excess arrives."""
    h = StreamHash()
    most = size if size is not None else options.max_file_bytes
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if have:
        with open(part, "rb") as f:
            while block := f.read(8 * 2**20):
                h.update(block)
        logger.info("resuming %s at byte %d", url, have)
        if progress:
            progress.add(have)
    state: _Stream = {"have": have, "hash": h}

    def attempt() -> None:
        have = state["have"]
        if size is not None and have == size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        with s.get(url, stream=True, timeout=options.timeout_s, headers=headers) as r:
            if r.status_code >= 400:
                raise http_error(r.status_code, url, r.reason)
            if have and r.status_code != 206:  # the server ignored Range: start again from byte 0
                logger.warning("%s ignored the Range request; downloading it again from the start", url)
                if progress:
                    progress.add(-have)
                state["hash"].close()
                state["have"], state["hash"], have = 0, StreamHash(), 0
            mode = "ab" if have else "wb"
            if arrival and not have:
                arrival.restart()
            with open(part, mode) as f:
                for block in r.iter_content(options.chunk_bytes):
                    if state["have"] + len(block) > most:
                        raise _sent_too_much(url, size, options)
                    f.write(block)
                    state["hash"].update(block)
                    state["have"] += len(block)
                    if progress:
                        progress.add(len(block))
                    if arrival:
                        f.flush()
                        arrival.reached(state["have"])
        if size is not None and state["have"] < size:
            raise TransientSourceError(
                f"{url}: connection closed after {state['have']} of {size} bytes", url=url
            )

    try:
        retrying(attempt, what=f"GET {url}", policy=options.policy, transient=is_transient, logger=logger)
    except BaseException:
        state["hash"].close()
        raise
    return state["hash"].hexdigest()


class _Stream(TypedDict):
    """A resumable stream's bytes in ``part`` and their running hash (its retried attempts update both)."""

    have: int
    hash: StreamHash


class _PrefixHash(TypedDict):
    """The sha256 of a ranged download's complete parts from the start: parts ``[0, next)``."""

    sha: HASH
    next: int
    stop: bool  # set when the download fails: no prefix hash opens ``part`` after it


class _Hashed(TypedDict):
    """An FTP download's bytes hashed so far and their running hash."""

    hashed: int
    hash: StreamHash


def _sent_too_much(url: str, size: int | None, options: DownloadOptions) -> SizeRefused:
    if size is not None:
        return SizeRefused(
            url, "body", f"longer than the {size} bytes announced", "the file's announced size"
        )
    bound = options.max_file_bytes
    return SizeRefused(
        url, "body", f"longer than {bound} bytes", f"max_file_bytes {bound} (no size announced)"
    )


class _Ranges:
    """The byte ranges ``[start, end)`` of a ranged download, computed on demand: nothing is allocated per
    part before the first is fetched (a list of them for Content-Length 10¹⁷ was a MemoryError)."""

    def __init__(self, size: int, part_bytes: int):
        self.size, self.starts = size, range(0, size, part_bytes)
        self.part_bytes = part_bytes

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[int, int]:
        start = self.starts[i]
        return start, min(self.size, start + self.part_bytes)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _http_parallel(
    url: str,
    part: Path,
    size: int,
    s: requests.Session,
    options: DownloadOptions,
    progress: Progress | None,
    logger: logging.Logger | logging.LoggerAdapter,
    arrival: Arrival | None = None,
) -> str:
    """``parallel`` ranged GETs into a preallocated ``part``; finished parts are listed in ``<dest>.parts``.

    Returns the file's sha256, computed while the download goes on: whenever the parts from the start
    of the file are complete, a short-lived thread hashes them (from the page cache), so the hashing
    overlaps the transfer instead of following it. The first missing part is fetched alone; if it came
    faster than ``fast_link_bytes_per_s``, the rest follow one at a time. A ranged GET answered whole
    (HTTP 200) raises ``_RangeIgnored``, and ``download`` starts again from byte 0 in one stream.
    """
    part_map = part.with_name(part.name.removesuffix(PART_SUFFIX) + PART_MAP_SUFFIX)
    ranges = _Ranges(size, options.part_bytes)
    finished: set[int] = set()
    if part.exists() and part.stat().st_size == size and part_map.exists():
        try:
            recorded = json.loads(part_map.read_text())
            if recorded.get("size") == size and recorded.get("part_bytes") == options.part_bytes:
                finished = {int(o) for o in recorded.get("done", [])}
        except ValueError:
            finished = set()
    else:
        with open(part, "wb") as f:
            f.truncate(size)
    if finished and arrival:
        arrival.reached(next((o for o, _ in ranges if o not in finished), size))
    if finished:
        logger.info("resuming %s: %d of %d parts already here", url, len(finished), len(ranges))
        if progress:
            progress.add(sum(e - o for o, e in ranges if o in finished))
    lock = threading.Lock()
    local = threading.local()
    hashing: _PrefixHash = {"sha": hashlib.sha256(), "next": 0, "stop": False}  # parts [0, next) are hashed
    hash_lock = threading.Lock()

    def hash_prefix(wait: bool = False) -> None:
        if not hash_lock.acquire(blocking=wait):
            return  # another thread is hashing; it (or the final call) takes this part too
        try:
            while not hashing["stop"] and hashing["next"] < len(ranges):
                start, end = ranges[hashing["next"]]
                with lock:
                    if start not in finished:
                        return
                with open(part, "rb") as f:
                    f.seek(start)
                    remaining = end - start
                    while remaining > 0:
                        block = f.read(min(8 * 2**20, remaining))
                        hashing["sha"].update(block)
                        remaining -= len(block)
                hashing["next"] += 1
        finally:
            hash_lock.release()

    def session() -> requests.Session:
        if not hasattr(local, "s"):
            local.s = requests.Session()
            local.s.headers.update(s.headers)
        return local.s

    def fetch(offset: int, end: int) -> None:
        got = {"n": 0}

        def attempt() -> None:
            start = offset + got["n"]
            if start >= end:
                return
            headers = {"Range": f"bytes={start}-{end - 1}"}
            with session().get(url, stream=True, timeout=options.timeout_s, headers=headers) as r:
                if r.status_code >= 400:
                    raise http_error(r.status_code, url, r.reason)
                if r.status_code != 206:
                    raise _RangeIgnored(
                        f"{url} answered a Range request with HTTP {r.status_code}; cannot fetch it in parts",
                        url=url,
                    )
                with open(part, "r+b") as f:
                    f.seek(start)
                    for block in r.iter_content(options.chunk_bytes):
                        block = block[: end - (offset + got["n"])]
                        f.write(block)
                        got["n"] += len(block)
                        if progress:
                            progress.add(len(block))
            if offset + got["n"] < end:
                raise TransientSourceError(
                    f"{url}: part {offset}-{end - 1} closed after {got['n']} bytes", url=url
                )

        retrying(
            attempt,
            what=f"GET {url} bytes {offset}-{end - 1}",
            policy=options.policy,
            transient=is_transient,
            logger=logger,
        )
        with lock:
            finished.add(offset)
            if arrival:
                arrival.reached(next((o for o, _ in ranges if o not in finished), size))
            tmp = part_map.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"size": size, "part_bytes": options.part_bytes, "done": sorted(finished)})
            )
            os.replace(tmp, part_map)
        threading.Thread(target=hash_prefix, name="sha256-prefix", daemon=True).start()

    def fetch_all() -> str:
        todo = [(o, e) for o, e in ranges if o not in finished]
        if not finished and len(todo) > 1 and options.parallel > 1 and options.fast_link_bytes_per_s:
            t0 = time.monotonic()
            fetch(*todo[0])
            rate = (todo[0][1] - todo[0][0]) / max(time.monotonic() - t0, 1e-9)
            if rate >= options.fast_link_bytes_per_s:
                logger.info(
                    "%s: one connection gives %.0f MB/s; fetching the rest in one stream", url, rate / 1e6
                )
                return _http_rest_in_one_stream(
                    url, part, todo[0][1], size, session(), options, progress, logger, arrival
                )
            todo = todo[1:]
        with ThreadPoolExecutor(max_workers=max(1, options.parallel), thread_name_prefix="ranged") as pool:
            futures = [pool.submit(fetch, o, e) for o, e in todo]
            errors = []
            for fut in futures:
                try:
                    fut.result()
                except Exception as exc:
                    errors.append(exc)
            if errors:  # a server ignoring Range first: the caller then starts again in one stream
                raise next((e for e in errors if isinstance(e, _RangeIgnored)), errors[0])
        hash_prefix(wait=True)
        if hashing["next"] != len(ranges):
            raise TransientSourceError(f"{url}: not every part arrived", url=url)
        return hashing["sha"].hexdigest()

    try:
        return fetch_all()
    except BaseException:
        with hash_lock:  # no prefix hash opens ``part`` after this: the caller may delete it
            hashing["stop"] = True
        raise


def _http_rest_in_one_stream(
    url: str,
    part: Path,
    start: int,
    size: int,
    s: requests.Session,
    options: DownloadOptions,
    progress: Progress | None,
    logger: logging.Logger | logging.LoggerAdapter,
    arrival: Arrival | None = None,
) -> str:
    """Bytes ``start``.. of a preallocated ``part`` in one ranged stream (the first ``start`` are there);
    returns the whole file's sha256, hashed on a second thread as the bytes arrive."""
    sha = StreamHash()
    try:
        with open(part, "rb") as f:
            remaining = start
            while remaining > 0:
                block = f.read(min(8 * 2**20, remaining))
                sha.update(block)
                remaining -= len(block)
        at = {"n": start}

        def attempt() -> None:
            if at["n"] >= size:
                return
            headers = {"Range": f"bytes={at['n']}-{size - 1}"}
            with s.get(url, stream=True, timeout=options.timeout_s, headers=headers) as r:
                if r.status_code >= 400:
                    raise http_error(r.status_code, url, r.reason)
                if r.status_code != 206:
                    raise _RangeIgnored(f"{url} stopped honouring Range requests", url=url)
                with open(part, "r+b") as f:
                    f.seek(at["n"])
                    for block in r.iter_content(options.chunk_bytes):
                        f.write(block)
                        sha.update(block)
                        at["n"] += len(block)
                        if progress:
                            progress.add(len(block))
                        if arrival:
                            f.flush()
                            arrival.reached(at["n"])
            if at["n"] < size:
                raise TransientSourceError(
                    f"{url}: connection closed after {at['n']} of {size} bytes", url=url
                )

        what = f"GET {url} from byte {start}"
        retrying(attempt, what=what, policy=options.policy, transient=is_transient, logger=logger)
    except BaseException:
        sha.close()
        raise
    return sha.hexdigest()


def _ftp_download(
    url: str,
    part: Path,
    expected_size: int | None,
    options: DownloadOptions,
    progress: Progress | None,
    logger: logging.Logger | logging.LoggerAdapter,
    arrival: Arrival | None = None,
) -> tuple[int, str]:
    """RETR into ``part``, continuing with REST from its current length; returns its size and sha256."""
    counted = {"n": 0}
    state: _Hashed = {"hashed": 0, "hash": StreamHash()}

    def catch_up() -> None:
        """Hash what is on disk but not yet hashed (a partial file from an earlier try or run)."""
        have = part.stat().st_size if part.exists() else 0
        if have < state["hashed"]:
            state["hash"].close()
            state["hashed"], state["hash"] = 0, StreamHash()
        with open(part, "rb") as f:
            f.seek(state["hashed"])
            while block := f.read(8 * 2**20):
                state["hash"].update(block)
                state["hashed"] += len(block)

    def attempt() -> tuple[int, str]:
        ftp, path = _ftp_connect(url, options)
        try:
            try:
                size = ftp.size(path)
            except ftplib.error_perm as exc:
                raise _ftp_permanent(exc, url) from None
            if size is not None:
                size = checked_size(url, "SIZE", size, options.max_file_bytes, listed=expected_size)
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:
                part.unlink()
                have = 0
            if have:
                catch_up()
            if progress and have > counted["n"]:
                progress.add(have - counted["n"])
                counted["n"] = have
            if size is not None and have == size:
                return size, state["hash"].hexdigest()
            if have:
                logger.info("resuming %s at byte %d (FTP REST)", url, have)
            else:
                state["hash"].close()
                state["hashed"], state["hash"] = 0, StreamHash()
            with open(part, "ab" if have else "wb") as f:

                def write(block: bytes) -> None:
                    if state["hashed"] + len(block) > (size if size is not None else options.max_file_bytes):
                        raise _sent_too_much(url, size, options)
                    f.write(block)
                    state["hash"].update(block)
                    state["hashed"] += len(block)
                    counted["n"] += len(block)
                    if progress:
                        progress.add(len(block))
                    if arrival:
                        f.flush()
                        arrival.reached(state["hashed"])

                try:
                    ftp.retrbinary(f"RETR {path}", write, blocksize=options.chunk_bytes, rest=have or None)
                except ftplib.error_perm as exc:
                    raise _ftp_permanent(exc, url) from None
            got = part.stat().st_size
            if size is not None and got < size:
                raise TransientSourceError(f"{url}: transfer ended after {got} of {size} bytes", url=url)
            return got, state["hash"].hexdigest()
        finally:
            _ftp_close(ftp)

    try:
        return retrying(
            attempt, what=f"RETR {url}", policy=options.policy, transient=is_transient, logger=logger
        )
    except BaseException:
        state["hash"].close()
        raise
