"""The daemon launches runs of the deployment's image with the deployment's options only: a run whose stored
origin asks for more (privileged, a host path, another image or entry point) is refused, saying why; a run's
tag naming another container gives terminate and run monitoring nothing to touch. (The container suite plays
the same attack against the real daemon and engine.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.origin import RepositoryPythonOrigin

from em_platform.deploy.dagster_instance import RunRefused, SelfCancellingDockerRunLauncher, run_refusal

IMAGE = "em-platform:latest"


def origin(**asked) -> RepositoryPythonOrigin:
    return RepositoryPythonOrigin(
        executable_path="/usr/local/bin/python",
        code_pointer=ModuleCodePointer(
            "em_platform.definitions", "defs", working_directory="/opt/em_platform"
        ),
        container_image=asked.pop("container_image", IMAGE),
        **asked,
    )


@pytest.mark.parametrize(
    "asked,refused",
    [
        ({"container_context": {"docker": {"container_kwargs": {"privileged": True}}}}, "privileged"),
        ({"container_context": {"docker": {"container_kwargs": {"volumes": ["/:/host"]}}}}, "/:/host"),
        ({"container_context": {"docker": {"networks": ["host"]}}}, "host"),
        ({"container_context": {"env_vars": ["LD_PRELOAD=/data/evil.so"]}}, "LD_PRELOAD"),
        ({"container_image": "alpine:latest"}, "alpine:latest"),
        ({"entry_point": ["sh", "-c", "id"]}, "entry point"),
    ],
)
def test_a_run_asking_beyond_the_deployment_is_refused_naming_what_it_asked(asked, refused):
    reason = run_refusal(origin(**asked), IMAGE)
    assert reason is not None and refused in reason
    launcher = SelfCancellingDockerRunLauncher(image=IMAGE)
    with pytest.raises(RunRefused, match="run not launched"):
        launcher._get_docker_image(SimpleNamespace(repository_origin=origin(**asked)))


def test_the_deployments_own_runs_are_launched_with_its_own_options_only():
    assert run_refusal(origin(), IMAGE) is None
    assert run_refusal(origin(container_image=None, entry_point=["dagster"]), IMAGE) is None
    assert "names no run image" in run_refusal(origin(), None)
    launcher = SelfCancellingDockerRunLauncher(image=IMAGE, container_kwargs={"auto_remove": True})
    assert launcher._get_docker_image(SimpleNamespace(repository_origin=origin())) == IMAGE
    run = SimpleNamespace(job_code_origin=SimpleNamespace(repository_origin=origin()), tags={})
    context = launcher.get_container_context(run)
    assert context.container_kwargs["auto_remove"] is True
    assert not {"privileged", "cap_add", "devices", "pid_mode"} & set(context.container_kwargs)


def test_a_tag_naming_another_container_is_not_acted_on(monkeypatch):
    launcher = SelfCancellingDockerRunLauncher(image=IMAGE)
    database = SimpleNamespace(labels={"com.docker.compose.service": "postgresql"})
    own = SimpleNamespace(labels={"dagster/run_id": "r1"})
    for found, expected in ((database, None), (own, own)):
        monkeypatch.setattr(
            SelfCancellingDockerRunLauncher.__mro__[1], "_get_container", lambda self, run, c=found: c
        )
        assert launcher._get_container(SimpleNamespace(run_id="r1", tags={})) is expected
