"""Loopback servers for the source tests: an HTTP file server and an FTP server, each serving a tmp folder."""

from __future__ import annotations

import logging

import pytest

from em_platform.sources.download import DownloadOptions
from em_platform.sources.retry import RetryPolicy
from tests.support.ftp_files import FtpFileServer
from tests.support.http_files import HttpFileServer

FAST = DownloadOptions(
    policy=RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05),
    fast_link_bytes_per_s=None,  # always in parallel parts: the tests count the requests
    part_bytes=256 * 1024,
    chunk_bytes=64 * 1024,
)


@pytest.fixture
def http_files(tmp_path):
    root = tmp_path / "http"
    root.mkdir()
    with HttpFileServer(root) as server:
        yield server


@pytest.fixture
def ftp_files(tmp_path):
    root = tmp_path / "ftp"
    root.mkdir()
    with FtpFileServer(root) as server:
        yield server


@pytest.fixture
def quiet_log():
    return logging.getLogger("tests.sources")
