"""The images and the stack as `make images` and `make compose-up` leave them: one container per service,
each healthy, only the UI, the viewer and the broker published, and only on loopback; the Docker API socket
in the daemon alone."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from em_platform.deploy.images import DOCKER, OFFICIAL_BASE, PYTHON_BASE, image_exists
from em_platform.deploy.services import SERVICES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _inspect(stack, name: str) -> dict:
    return json.loads(stack.stack.engine_cmd("inspect", name, check=True).stdout)[0]


def test_both_dockerfiles_build_from_the_base_they_are_given(stack):
    for dockerfile in ("Dockerfile", "Dockerfile.dagster"):
        text = (DOCKER / dockerfile).read_text()
        assert f"ARG BASE_IMAGE={OFFICIAL_BASE}\nFROM ${{BASE_IMAGE}}" in text, dockerfile  # Docker's default
    tool = stack.stack.tool
    user_code = _inspect(stack, "em-platform:latest")
    if not image_exists(tool, OFFICIAL_BASE):  # built here from the Debian base make images made
        base = _inspect(stack, PYTHON_BASE)
        assert base["RootFS"]["Layers"][0] == user_code["RootFS"]["Layers"][0]
    # the CA bundle pip trusted during the build was a secret of the build, in no layer or setting
    env = user_code["Config"]["Env"]
    assert not [e for e in env if e.startswith(("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT"))], env
    probe = stack.stack.engine_cmd(
        "run", "--rm", "--entrypoint", "sh", "em-platform:latest", "-c", "ls /run/secrets 2>/dev/null | wc -l"
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "0", probe.stdout + probe.stderr


def test_one_container_per_service_each_running_and_healthy(stack):
    shown = stack.make("compose-status")  # what the deployment page tells an operator to run
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = {}
    for line in shown.stdout.splitlines():
        name, state, health = line.split()
        rows[name] = (state, health)
    workers = int(stack.settings["DASK_WORKERS"])
    for svc in SERVICES:
        names = stack.stack.container_names(svc.name)
        assert len(names) == (workers if svc.replicas else 1), (svc.name, names)
        for name in names:
            state, health = rows[name]
            if svc.restart == "no":  # one-shot: the secrets check, the bucket
                assert state == "exited" and stack.stack.state_of(name)["ExitCode"] == 0, (name, state)
            else:
                assert state == "running", (name, state)
                assert health == ("healthy" if svc.probe and svc.probe.kind != "log" else "-"), (name, health)


def test_the_ui_answers_on_loopback_and_only_published_ports_are_reachable(stack):
    with urllib.request.urlopen(f"{stack.webserver}/server_info", timeout=10) as resp:
        assert json.load(resp)["dagster_webserver_version"]
    published = {}
    test_only = {"postgresql", "minio", "dask-scheduler"}  # tests/compose/compose.test.yaml, for the tests
    for svc in SERVICES:
        for name in stack.stack.container_names(svc.name):
            bindings = _inspect(stack, name)["HostConfig"].get("PortBindings") or {}
            for port, hosts in bindings.items():
                for host in hosts or []:
                    published.setdefault(svc.name, []).append((host["HostIp"], port))
    assert set(published) - test_only == {"webserver", "viewer", "rabbitmq"}, published
    for svc, binds in published.items():
        assert all(ip == "127.0.0.1" for ip, _ in binds), (svc, binds)


def test_only_the_daemon_holds_the_engine_socket(stack):
    def mounts(service: str) -> list[str]:
        return [m["Destination"] for m in _inspect(stack, stack.container(service))["Mounts"]]

    assert "/var/run/docker.sock" in mounts("daemon")
    for svc in SERVICES:
        if svc.name != "daemon" and stack.stack.container_names(svc.name):
            assert "/var/run/docker.sock" not in mounts(svc.name), svc.name
    # and it answers the Docker API there (docker-py, which dagster-docker launches runs with)
    check = "import docker; print(docker.from_env().version()['ApiVersion'])"
    done = stack.stack.engine_cmd("exec", stack.container("daemon"), "python", "-c", check)
    assert done.returncode == 0 and re.match(r"^\d+\.\d+", done.stdout.strip()), done.stdout + done.stderr
