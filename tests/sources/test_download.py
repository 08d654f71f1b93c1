"""The download layer against loopback HTTP and FTP servers: resume, retries, permanent errors, checksums."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import pytest

from em_platform.sources.download import DownloadOptions, download, get_json, list_ftp, stat_remote
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.progress import Progress
from em_platform.sources.retry import ChecksumMismatch, PermanentSourceError, TransientSourceError
from tests.sources.conftest import FAST

MiB = 2**20


def _file(root, name, n, seed=0):
    data = os.urandom(0) or bytes((i * 7 + seed) % 251 for i in range(256)) * (n // 256) + os.urandom(n % 256)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _manifest(tmp_path, fp="v1"):
    return DownloadManifest(tmp_path / "work", fp)


def test_stream_download_verifies_and_records(tmp_path, http_files, quiet_log):
    src, digest = _file(http_files.root, "a.bin", 200_000)
    m = _manifest(tmp_path)
    opts = DownloadOptions(policy=FAST.policy, parallel=1)
    entry = download(
        http_files.url_for("a.bin"),
        m.folder / "a.bin",
        manifest=m,
        expected_sha256=digest,
        options=opts,
        logger=quiet_log,
    )
    assert (m.folder / "a.bin").read_bytes() == src.read_bytes()
    assert entry.sha256 == digest and entry.size_bytes == 200_000
    assert DownloadManifest(m.folder, "v1").get("a.bin") == entry  # durable
    # a re-run asks the network nothing
    n = len(http_files.log)
    download(http_files.url_for("a.bin"), m.folder / "a.bin", manifest=m, options=opts, logger=quiet_log)
    assert len(http_files.log) == n


def test_a_dropped_connection_resumes_where_it_stopped(tmp_path, http_files, quiet_log):
    src, digest = _file(http_files.root, "big.bin", 600_000)
    http_files.drop_next("big.bin", after_bytes=250_000)
    m = _manifest(tmp_path)
    entry = download(
        http_files.url_for("big.bin"),
        m.folder / "big.bin",
        manifest=m,
        options=DownloadOptions(policy=FAST.policy, parallel=1, chunk_bytes=50_000),
        logger=quiet_log,
    )
    gets = http_files.requests_for("big.bin")
    assert [g.range for g in gets] == [None, "bytes=250000-"]
    assert entry.sha256 == digest
    assert (m.folder / "big.bin").read_bytes() == src.read_bytes()


def test_a_killed_run_resumes_from_the_partial_file(tmp_path, http_files, quiet_log):
    src, digest = _file(http_files.root, "big.bin", 600_000)
    # more drops than tries: this run gives up, leaving the partial file
    http_files.drop_next("big.bin", after_bytes=100_000, n=FAST.policy.attempts)
    m = _manifest(tmp_path)
    opts = DownloadOptions(policy=FAST.policy, parallel=1, chunk_bytes=50_000)
    with pytest.raises(TransientSourceError, match="still failing"):
        download(
            http_files.url_for("big.bin"), m.folder / "big.bin", manifest=m, options=opts, logger=quiet_log
        )
    assert not (m.folder / "big.bin").exists()
    have = (m.folder / "big.bin.part").stat().st_size
    assert have == 100_000 * FAST.policy.attempts
    entry = download(
        http_files.url_for("big.bin"), m.folder / "big.bin", manifest=m, options=opts, logger=quiet_log
    )
    assert http_files.requests_for("big.bin")[-1].range == f"bytes={have}-"
    assert entry.sha256 == digest


def test_server_errors_are_retried_then_succeed(tmp_path, http_files, quiet_log, caplog):
    _, digest = _file(http_files.root, "a.bin", 10_000)
    http_files.fail_next("a.bin", 1, 500)  # the HEAD
    http_files.fail_next("a.bin", 0)
    m = _manifest(tmp_path)
    with caplog.at_level("WARNING"):
        entry = download(
            http_files.url_for("a.bin"), m.folder / "a.bin", manifest=m, options=FAST, logger=quiet_log
        )
    assert entry.sha256 == digest
    assert "HTTP 500" in caplog.text
    http_files.fail_next("b.json", 2, 503)
    http_files.add_json("b.json", {"ok": True})
    assert get_json(http_files.url_for("b.json"), options=FAST, logger=quiet_log) == {"ok": True}


def test_404_is_permanent_and_names_the_url(tmp_path, http_files, quiet_log):
    m = _manifest(tmp_path)
    url = http_files.url_for("missing.tif")
    with pytest.raises(PermanentSourceError, match="404") as err:
        download(url, m.folder / "missing.tif", manifest=m, options=FAST, logger=quiet_log)
    assert url in str(err.value)
    assert len(http_files.requests_for("missing.tif", "HEAD")) == 1  # not retried
    assert not list(m.folder.glob("missing.tif*"))


def test_checksum_mismatch_discards_the_download(tmp_path, http_files, quiet_log):
    _file(http_files.root, "a.bin", 50_000)
    m = _manifest(tmp_path)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        download(
            http_files.url_for("a.bin"),
            m.folder / "a.bin",
            manifest=m,
            expected_sha256="0" * 64,
            options=FAST,
            logger=quiet_log,
        )
    assert not list(m.folder.glob("a.bin*")) and m.get("a.bin") is None


def test_parallel_ranged_parts_and_a_failed_part_resumes(tmp_path, http_files, quiet_log):
    size = 5 * 256 * 1024 + 1234  # six parts
    src, digest = _file(http_files.root, "vol.tif", size)
    m = _manifest(tmp_path)
    opts = dataclasses.replace(FAST, parallel=2, part_bytes=256 * 1024, chunk_bytes=64 * 1024)
    # two parts arrive, then the link breaks for good: this run stops, the two finished parts are kept
    http_files.drop_next("vol.tif", after_bytes=1000, n=1000, skip=2)
    with pytest.raises(TransientSourceError, match="still failing"):
        download(
            http_files.url_for("vol.tif"), m.folder / "vol.tif", manifest=m, options=opts, logger=quiet_log
        )
    assert not (m.folder / "vol.tif").exists()
    http_files.clear_faults()
    n = len(http_files.log)
    progress = Progress("vol", size, quiet_log)
    entry = download(
        http_files.url_for("vol.tif"),
        m.folder / "vol.tif",
        manifest=m,
        options=opts,
        progress=progress,
        logger=quiet_log,
    )
    assert entry.sha256 == digest and (m.folder / "vol.tif").read_bytes() == src.read_bytes()
    second = [g for g in http_files.log[n:] if g.method == "GET"]
    assert len(second) == 4  # only the four parts that had not finished
    assert progress.done == size


def test_a_server_ignoring_range_cannot_corrupt_the_file(tmp_path, http_files, quiet_log):
    src, digest = _file(http_files.root, "a.bin", 300_000)
    http_files.drop_next("a.bin", after_bytes=120_000)
    http_files.ignore_range("a.bin")
    m = _manifest(tmp_path)
    entry = download(
        http_files.url_for("a.bin"),
        m.folder / "a.bin",
        manifest=m,
        options=DownloadOptions(policy=FAST.policy, parallel=1, chunk_bytes=40_000),
        logger=quiet_log,
    )
    assert entry.sha256 == digest and (m.folder / "a.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("probe", [False, True])
def test_parallel_parts_from_a_server_ignoring_range_start_again_in_one_stream(
    tmp_path, http_files, caplog, probe
):
    # HEAD advertises byte ranges, but every ranged GET comes back whole (HTTP 200): the parts must not be
    # stitched from wrong offsets; the download starts again from byte 0 in one stream.
    size = 5 * 256 * 1024 + 99
    src, digest = _file(http_files.root, "vol.tif", size)
    http_files.ignore_range("vol.tif")
    m = _manifest(tmp_path)
    opts = dataclasses.replace(FAST, parallel=2, fast_link_bytes_per_s=1.0 if probe else None)
    progress = Progress("vol", size, logging.getLogger("tests.sources.norange"))
    with caplog.at_level("WARNING", logger="tests.sources.norange"):
        entry = download(
            http_files.url_for("vol.tif"),
            m.folder / "vol.tif",
            manifest=m,
            options=opts,
            progress=progress,
            logger=logging.getLogger("tests.sources.norange"),
        )
    assert entry.sha256 == digest and (m.folder / "vol.tif").read_bytes() == src.read_bytes()
    assert "from the start in one stream" in caplog.text
    gets = http_files.requests_for("vol.tif")
    assert gets[-1].range is None and all(g.status == 200 for g in gets)
    assert progress.done == size  # bytes of the abandoned parts are not counted twice
    assert not (m.folder / "vol.tif.parts").exists()


def test_ftp_download_list_stat_and_resume(tmp_path, ftp_files, quiet_log):
    src, digest = _file(ftp_files.root, "data/s1.dm3", 400_000)
    _file(ftp_files.root, "data/s2.dm3", 1000)
    assert list_ftp(ftp_files.url_for("data/"), options=FAST, logger=quiet_log) == ["s1.dm3", "s2.dm3"]
    assert stat_remote(ftp_files.url_for("data/s1.dm3"), options=FAST, logger=quiet_log).size_bytes == 400_000
    ftp_files.drop_next(after_bytes=150_000)
    m = _manifest(tmp_path)
    entry = download(
        ftp_files.url_for("data/s1.dm3"), m.folder / "s1.dm3", manifest=m, options=FAST, logger=quiet_log
    )
    assert entry.sha256 == digest and (m.folder / "s1.dm3").read_bytes() == src.read_bytes()
    assert [r for _, r in ftp_files.retr] == [0, 150_000]  # the second RETR continued with REST


def test_ftp_missing_file_is_permanent(tmp_path, ftp_files, quiet_log):
    m = _manifest(tmp_path)
    url = ftp_files.url_for("data/nope.dm3")
    with pytest.raises(PermanentSourceError, match="550") as err:
        download(url, m.folder / "nope.dm3", manifest=m, options=FAST, logger=quiet_log)
    assert url in str(err.value)


def test_bad_json_is_permanent(http_files, quiet_log):
    (http_files.root / "page.html").write_text("<html>not json</html>")
    with pytest.raises(PermanentSourceError, match="did not answer JSON"):
        get_json(http_files.url_for("page.html"), options=FAST, logger=quiet_log)


def test_a_changed_source_starts_the_manifest_afresh(tmp_path):
    from em_platform.sources.manifest import ManifestEntry

    m = DownloadManifest(tmp_path, "v1")
    m.add(ManifestEntry("a", "http://x/a", 1, "0" * 64))
    assert DownloadManifest(tmp_path, "v1").get("a") is not None
    again = DownloadManifest(tmp_path, "v2")
    assert again.get("a") is None and "changed" in again.reset_because
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"key": "torn')  # a crash mid-line
    assert DownloadManifest(tmp_path, "v2").entries() == {}


@pytest.mark.parametrize("threshold, one_stream", [(1.0, True), (1e15, False)])
def test_a_fast_first_part_means_the_rest_come_in_one_stream(
    tmp_path, http_files, caplog, threshold, one_stream
):
    size = 4 * 256 * 1024 + 17
    src, digest = _file(http_files.root, "vol.tif", size)
    m = _manifest(tmp_path)
    opts = dataclasses.replace(FAST, parallel=4, part_bytes=256 * 1024, fast_link_bytes_per_s=threshold)
    with caplog.at_level("INFO", logger="tests.sources.fast"):
        entry = download(
            http_files.url_for("vol.tif"),
            m.folder / "vol.tif",
            manifest=m,
            options=opts,
            logger=logging.getLogger("tests.sources.fast"),
        )
    assert entry.sha256 == digest and (m.folder / "vol.tif").read_bytes() == src.read_bytes()
    assert ("fetching the rest in one stream" in caplog.text) is one_stream
    gets = http_files.requests_for("vol.tif")
    # a fast link: the first part, then the rest in one ranged stream; otherwise one GET per part
    assert len(gets) == (2 if one_stream else 5)


def test_offline_the_failure_says_no_network_in_its_first_line():
    """A host name that does not resolve (here `.invalid`, which never does; offline, every one): after the
    retries the error's first words are "no network", and it says what to do instead."""
    import urllib.request

    from em_platform.sources.retry import RetryPolicy, TransientSourceError, no_network, retrying

    def fetch() -> bytes:
        with urllib.request.urlopen("http://ftp.ebi.ac.uk.invalid/empiar/", timeout=10) as answer:
            return answer.read()

    with pytest.raises(TransientSourceError) as err:
        retrying(fetch, what="EMPIAR 11759's listing", policy=RetryPolicy(attempts=2, base_delay_s=0.01))
    first = str(err.value).splitlines()[0]
    assert first.startswith("no network: EMPIAR 11759's listing could not resolve"), first
    assert "docs/ingests.md" in first
    assert not no_network(ConnectionResetError("Connection reset by peer"))  # a network that is there
