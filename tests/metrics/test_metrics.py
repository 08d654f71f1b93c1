"""The metrics package: a tile's scope label, the metrics address a service is given, and a served /metrics."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from em_platform.metrics.exporter import MetricsAddress, MetricsConfigError, serve_from
from em_platform.metrics.live import count_verdicts
from em_platform.metrics.scopes import OTHER, scope_of
from tests.support.metrics import scrape
from tests.support.ports import free_port


def test_a_tile_is_labelled_by_the_share_it_lies_on_and_nothing_else():
    shares = ["/mnt/scopes/temca2", "/mnt/scopes/temca2-spare", "/mnt/temca3/"]
    assert scope_of("/mnt/scopes/temca2/m1/t.tiff", shares) == "temca2"
    assert scope_of("/mnt/scopes/temca2-spare/m1/t.tiff", shares) == "temca2-spare"  # not a prefix match
    assert scope_of("/mnt/temca3/t.tiff", shares) == "temca3"
    assert scope_of("/mnt/scopes/temca2", shares) == "temca2"
    # a path on no share, or no shares at all: one label, so ids never become label values
    assert scope_of("/elsewhere/m-4711/t-1.tiff", shares) == OTHER
    assert scope_of("/mnt/scopes/temca2/t.tiff", None) == OTHER


@pytest.mark.parametrize(
    "text, host, port",
    [("9470", "127.0.0.1", 9470), ("127.0.0.1:9470", "127.0.0.1", 9470), ("[::1]:9470", "::1", 9470),
     ("0.0.0.0:9470", "0.0.0.0", 9470)],
)  # fmt: skip
def test_a_metrics_address_is_a_port_or_host_and_port(text, host, port):
    assert MetricsAddress.parse(text, "EM_LIVE_QC_METRICS") == MetricsAddress(host, port)


@pytest.mark.parametrize("text", ["metrics", "127.0.0.1:", "127.0.0.1:70000", "scope-pc:9470", ":0"])
def test_a_bad_metrics_address_names_the_setting_and_the_form(text):
    with pytest.raises(MetricsConfigError, match=r"EM_LIVE_QC_METRICS=.*(HOST:PORT|not an IP address)"):
        MetricsAddress.parse(text, "EM_LIVE_QC_METRICS")


def test_unset_serves_nothing_and_a_taken_port_is_an_error_naming_the_setting():
    assert serve_from({}, "EM_LIVE_QC_METRICS") is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsConfigError, match=rf"EM_LIVE_QC_METRICS='127.0.0.1:{port}'.*free port"):
            serve_from({"EM_LIVE_QC_METRICS": f"127.0.0.1:{port}"}, "EM_LIVE_QC_METRICS")


def _tile(path: str, passed: bool, seconds: float, error: str | None = None):
    return SimpleNamespace(
        tile=SimpleNamespace(path=path),
        verdict=SimpleNamespace(passed=passed),
        error=error,
        times={"landed": 100.0, "verdict": 100.0 + seconds},
    )


def test_verdicts_are_counted_by_scope_and_verdict_with_their_latency_served_on_loopback():
    address = serve_from({"EM_LIVE_QC_METRICS": str(free_port())}, "EM_LIVE_QC_METRICS")
    assert address.host == "127.0.0.1" and address.url.startswith("http://127.0.0.1:")
    before = scrape(address.url)

    def grown(after, name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    count_verdicts(
        [
            _tile("/shares/scopeA/m/t1.tiff", True, 0.3),
            _tile("/shares/scopeA/m/t2.tiff", False, 0.7),
            _tile("/shares/scopeB/m/t1.tiff", False, 1.7, error="truncated TIFF"),
        ],
        ["/shares/scopeA", "/shares/scopeB"],
    )
    after = scrape(address.url)
    judged = "em_tiles_judged_total"
    assert grown(after, judged, (("scope", "scopeA"), ("verdict", "passed"))) == 1
    assert grown(after, judged, (("scope", "scopeA"), ("verdict", "failed"))) == 1
    assert grown(after, judged, (("scope", "scopeB"), ("verdict", "error"))) == 1
    assert grown(after, "em_live_qc_latency_seconds_count") == 3
    assert grown(after, "em_live_qc_latency_seconds_bucket", (("le", "1.0"),)) == 2
    assert grown(after, "em_live_qc_latency_seconds_sum") == pytest.approx(2.7)
