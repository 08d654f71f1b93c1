"""The code location loads the way Dagster's own tools load it: CLI validation and the web server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    return {**os.environ, "DAGSTER_HOME": str(home), "EM_DATA_ROOT": str(tmp_path / "data")}


def test_definitions_load_with_every_asset_check_sensor_and_job(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_DATA_ROOT", str(tmp_path / "data"))
    from em_platform.definitions import build_definitions
    from em_platform.resources import build_resources

    defs = build_definitions(build_resources())
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"ingest/local", "catalog/metadata_catalog"} <= keys
    assert defs.resolve_sensor_def("inbox_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_job_def("ingest_local_job")


def test_dagster_definitions_validate_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@pytest.mark.slow
def test_web_ui_serves_assets_lineage_and_sensor(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_webserver",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # poll the server until it answers (or give up with its log)
            if proc.poll() is not None:
                pytest.fail(f"webserver exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("webserver did not answer within 180 s")
                time.sleep(0.5)
        nodes = _graphql(
            port, "{ assetNodes { assetKey { path } groupName isPartitioned dependencyKeys { path } } }"
        )
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes["data"]["assetNodes"]}
        assert by_key["ingest/local"]["isPartitioned"] and by_key["ingest/local"]["groupName"] == "ingest"
        ingests = [["ingest", s] for s in ("empiar", "epfl", "flyem", "idr", "local", "openorganelle")]
        writers = [*ingests, ["montage_upload"], ["simulation", "tilt_series"]]  # all that write records
        assert sorted(d["path"] for d in by_key["catalog/metadata_catalog"]["dependencyKeys"]) == sorted(
            writers
        )
        for name in ("empiar", "epfl", "flyem", "idr", "openorganelle"):  # the public ingests, partitioned
            assert (
                by_key[f"ingest/{name}"]["isPartitioned"]
                and by_key[f"ingest/{name}"]["groupName"] == "ingest"
            )
        repos = _graphql(
            port,
            "{ repositoriesOrError { ... on RepositoryConnection { nodes { location { name } sensors { name } } } } }",
        )
        [repo] = repos["data"]["repositoriesOrError"]["nodes"]
        assert repo["location"]["name"] == "em_platform"
        assert "inbox_sensor" in {s["name"] for s in repo["sensors"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_every_multi_part_key_is_in_the_group_its_prefix_names():
    """The asset catalog's groups and the keys say the same thing (simulation/evaluation in `simulation`)."""
    from em_platform.definitions import defs

    graph = defs.resolve_asset_graph()
    wrong = {
        k.to_user_string(): graph.get(k).group_name
        for k in graph.get_all_asset_keys()
        if len(k.path) > 1 and graph.get(k).group_name != k.path[0]
    }
    assert wrong == {}
