"""``em-platform scope-sim --broker`` knows whether the platform heard it: it waits for the ``qc.tile``
verdicts of its tiles, and silence (nobody subscribed under its topic prefix) is an error that names the
broker and the topics, not "9/9 tiles"."""

from __future__ import annotations

import threading

from em_platform.cli import main
from em_platform.tem.broker import BrokerSettings
from em_platform.tem.journal import Journal
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.tile_source import JournalTileSource, Outbox
from tests.support.polling import wait_until

SMALL = ["--tile-size", "64", "--overlap", "0.25", "--jitter", "2", "--brightfield-frames", "0"]
SMALL += ["--darkfield-frames", "0"]


def _scope_sim(stomp_broker, tmp_path, monkeypatch, *extra: str) -> list[str]:
    monkeypatch.setenv("EM_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("EM_BROKER_TOPIC_PREFIX", stomp_broker.topic_prefix)
    return [
        "scope-sim",
        "--broker",
        f"{stomp_broker.host}:{stomp_broker.port}",
        "--out",
        str(tmp_path / "data" / "scope"),  # the default scope share (EM_SCOPE_SHARES: <data root>/scope)
        *SMALL,
        *extra,
    ]


def test_scope_sim_with_nobody_listening_stops_and_fails_naming_the_topics(
    tmp_path, stomp_broker, monkeypatch, capsys
):
    """No listener under the scope's prefix: the broker drops every message. The scope stops acquiring
    once it has heard nothing for the timeout and exits 3, naming the broker, the prefix and the topics."""
    argv = _scope_sim(stomp_broker, tmp_path, monkeypatch, "--rows", "3", "--columns", "4", "--rate", "4")
    assert main([*argv, "--verdict-timeout", "0.5", "--montage-id", "m-nobody"]) == 3
    out, err = capsys.readouterr()
    acquired = int(out.split("m-nobody: ")[1].split("/")[0])
    assert acquired < 12, out  # stopped (the 12 tiles take 2.75 s at 4/s): nobody judges what it images
    assert "0/" in out and "judged by the platform (qc.tile)" in out
    assert "no tile of montage m-nobody got a qc.tile verdict within 0.5 s" in err
    assert f"{stomp_broker.topic_prefix}tile.raw" in err and f"{stomp_broker.topic_prefix}qc.tile" in err
    assert f"{stomp_broker.host}:{stomp_broker.port}" in err and "EM_BROKER_TOPIC_PREFIX" in err


def test_scope_sim_heard_by_the_platform_exits_zero(
    tmp_path, stomp_broker, start_listener, monkeypatch, capsys
):
    """The listener journals the scope's tiles, a live montage run judges them and its verdicts go back on
    the broker: the scope hears a qc.tile for every tile and says so."""
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    start_listener(journal)
    publisher = BrokerSettings(
        stomp_broker.host, stomp_broker.port, topic_prefix=stomp_broker.topic_prefix
    ).publisher()
    done: dict = {}

    def platform():
        wait_until(lambda: journal.montage("m-heard"), 30, "the montage journaled")
        source = JournalTileSource(journal, pixel_size_nm=4.0, outbox=Outbox(publisher.publish_many))
        done["result"] = run_montage(
            "m-heard",
            source,
            done["client"],
            processed_url=str(tmp_path / "p.zarr"),
            config=MontageRunConfig(poll_seconds=0.02, late_tile_seconds=2.0),
        )
        source.close()

    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        done["client"] = client
        run = threading.Thread(target=platform)
        run.start()
        argv = _scope_sim(stomp_broker, tmp_path, monkeypatch, "--rows", "2", "--columns", "2")
        assert main([*argv, "--verdict-timeout", "30", "--montage-id", "m-heard"]) == 0
        run.join(30)
    publisher.close()
    out = capsys.readouterr().out
    assert "m-heard: 4/4 tiles" in out and "4/4 judged by the platform (qc.tile)" in out
    assert len(done["result"].tiles) == 4
