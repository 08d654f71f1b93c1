"""docker/: the compose file is the service table's, valid Compose, and agrees with the process runner service
by service; the instance config keeps the embedded limits; the images run what the table says. No Docker
engine is needed (none runs here): the Compose spec's JSON schema checks the file, and Docker's compose tool
too where it is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from em_platform.deploy.compose import COMPOSE_FILE, compose_addresses, compose_yaml
from em_platform.deploy.processes import DEBIAN_NAMES, ProcessTopology, process_only_args
from em_platform.deploy.services import DAGSTER_IMAGE, EM_IMAGE, IMAGE_ENV, SERVICES, platform_env, service
from em_platform.deploy.templates import MissingSetting, interpolate, place, variables
from tests.deploy.compose_values import compose_to_process

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_file_is_generated_from_the_service_table():
    assert COMPOSE_FILE.read_text() == compose_yaml(), (
        "docker/compose.yaml differs from em_platform/deploy/services.py: run `make deploy-compose`"
    )
    assert list(compose()["services"]) == [s.name for s in SERVICES]


def test_compose_file_is_valid_against_the_compose_specification_schema():
    """The Compose Specification's own JSON schema: check-jsonschema (a test dependency, so this runs on every
    machine) vendors compose-spec/compose-spec's `schema/compose-spec.json` from its master branch, with the
    spec's licence, and refreshes it each release; upstream moved from draft-07 to 2020-12 (`$defs`)."""
    from check_jsonschema.catalog import SCHEMA_CATALOG

    assert SCHEMA_CATALOG["compose-spec"]["url"].endswith(
        "/compose-spec/compose-spec/master/schema/compose-spec.json"
    )
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    assert schema["title"] == "Compose Specification"
    validator = jsonschema.validators.validator_for(schema)  # the draft its `$schema` names
    validator.check_schema(schema)
    validator(schema).validate(compose())
    broken = compose()
    webserver = broken["services"]["webserver"]
    webserver["depends_on"]["user-code"]["condition"] = "service_ready"  # no such condition
    with pytest.raises(jsonschema.ValidationError, match="service_ready"):
        validator(schema).validate(broken)


def test_docker_compose_config_accepts_the_file_with_the_example_env(tmp_path):
    """`docker compose config` (or Compose v1's `docker-compose config`) where Docker's compose tool exists."""
    tools = []
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        tools.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    if not tools:
        reason = (
            "neither `docker compose` (the compose plugin) nor `docker-compose` is installed; the Compose "
            "schema test above still checks docker/compose.yaml (Debian: apt-get install docker-compose)"
        )
        print(reason)
        pytest.skip(reason)
    for tool in tools:
        args = [*tool, "--env-file", str(DOCKER / ".env.example"), "-f", str(COMPOSE_FILE)]
        done = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(tool)} config: {done.stderr}"
        resolved = yaml.safe_load(done.stdout)
        assert set(resolved["services"]) == {s.name for s in SERVICES}
        worker = resolved["services"]["dask-worker"]
        assert worker["environment"]["DASK_SCHEDULER_ADDRESS"] == "tcp://dask-scheduler:8786"
        assert worker["environment"]["EM_S3_ENDPOINT_URL"] == "http://minio:9000"  # empty in .env: MinIO
        # without the secrets compose refuses to start, naming what to set: the caller's environment (its
        # PATH finds the tool, as above) minus every setting the file reads, and an empty env file in
        # place of a docker/.env an operator may have written
        no_settings = tmp_path / "empty.env"
        no_settings.write_text("")
        env = {k: v for k, v in os.environ.items() if k not in variables(COMPOSE_FILE.read_text())}
        missing = subprocess.run(
            [*tool, "--env-file", str(no_settings), "-f", str(COMPOSE_FILE), "config"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert missing.returncode != 0 and "in docker/.env" in missing.stderr, missing.stderr


def test_every_setting_compose_reads_is_documented_in_the_env_example():
    used = variables(COMPOSE_FILE.read_text())
    example = DOCKER / ".env.example"
    documented = {
        line.split("=", 1)[0] for line in example.read_text().splitlines() if re.match(r"^[A-Z0-9_]+=", line)
    }
    assert used - documented == set(), f"set in compose.yaml but not documented in {example}"
    assert documented - used - {"COMPOSE_PROJECT_NAME"} == set(), f"documented in {example} but never used"


def test_production_instance_keeps_the_embedded_limits_and_launches_runs_as_containers(monkeypatch, tmp_path):
    embedded = yaml.safe_load((REPO / "dagster.yaml").read_text())
    production = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    for key in (
        "run_coordinator",
        "concurrency",
        "run_retries",
        "run_monitoring",
        "sensors",
        "retention",
        "telemetry",
        "nux",
    ):
        assert production[key] == embedded[key], f"docker/dagster.yaml `{key}` differs from dagster.yaml"
    launcher = production["run_launcher"]
    # the Docker launcher, whose Terminate needs no socket (tests/orchestration/test_self_cancelling_runs.py)
    assert (launcher["module"], launcher["class"]) == (
        "em_platform.deploy.dagster_instance",
        "SelfCancellingDockerRunLauncher",
    )
    # the run containers get exactly the platform's environment, which the daemon holds to pass on
    from em_platform.deploy.dask_tls import TLS_ENV

    assert set(launcher["config"]["env_vars"]) == set(platform_env()) | set(TLS_ENV)
    assert set(platform_env()) <= set(compose()["services"]["daemon"]["environment"])
    # run containers join their stack: the network and named volumes compose names after its project
    from em_platform.deploy.dagster_instance import STACK_ENV, stack_mounts
    from em_platform.deploy.services import STACK_ENV as SERVICES_STACK_ENV
    from em_platform.deploy.services import STACK_NAME

    assert STACK_ENV == SERVICES_STACK_ENV
    assert compose()["services"]["daemon"]["environment"][STACK_ENV] == STACK_NAME
    networks, volumes = stack_mounts(STACK_NAME)
    assert networks == [compose()["networks"]["em-platform"]["name"]]
    named = {v["name"] for v in compose()["volumes"].values() if v and "name" in v}
    mounted = {v[: v.index("}") + 1] + v[v.index("}") + 1 :].split(":")[0] for v in volumes}  # ${...}-name
    assert mounted == named == {f"{STACK_NAME}-{v}" for v in ("data", "compute-logs", "dask-certs")}
    assert (
        launcher["config"]["container_kwargs"]["auto_remove"] is True
    )  # a run's container goes when it ends
    # Dagster's own schema accepts the file (nothing connects: only the config is checked)
    from dagster._core.instance.config import dagster_instance_config

    for key in ("HOST", "PORT", "USER", "PASSWORD", "DB"):
        monkeypatch.setenv(f"DAGSTER_POSTGRES_{key}", "5432" if key == "PORT" else "x")
    shutil.copy(DOCKER / "dagster.yaml", tmp_path / "dagster.yaml")
    config, instance_class = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "SelfCancellingDockerRunLauncher"
    assert instance_class.__name__ == "FacilityInstance"


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def test_images_run_what_the_table_says():
    user_code = _dockerfile("Dockerfile")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", user_code, re.M).group(1))
    assert cmd == compose()["services"]["user-code"]["command"]
    for name, image in (("Dockerfile", EM_IMAGE), ("Dockerfile.dagster", DAGSTER_IMAGE)):
        text = _dockerfile(name)
        env = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV (.+)$", text, re.M))))
        assert {k: env.get(k) for k in IMAGE_ENV[image]} == IMAGE_ENV[image], name
        for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for path in source.split():
                assert (REPO / path).exists(), f"{name} copies {path}, which is not in the repository"
        ignore = (DOCKER / f"{name}.dockerignore").read_text()
        assert ignore.startswith("# ") and "\n*\n" in ignore  # context: only what the image copies
    assert "docker/workspace.yaml" in _dockerfile("Dockerfile.dagster")


def test_both_images_pin_one_dagster_release_within_the_project_ranges():
    pins = dict(
        line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines() if "==" in line
    )
    core = {
        pins[p]
        for p in ("dagster", "dagster-webserver", "dagster-graphql", "dagster-pipes", "dagster-shared")
    }
    libs = {pins[p] for p in ("dagster-postgres", "dagster-docker")}
    assert len(core) == 1 and len(libs) == 1, pins
    [core_v], [lib_v] = core, libs
    assert lib_v == "0." + core_v.split(".", 1)[1].replace("13.", "29.", 1)  # 1.13.x <-> 0.29.x
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement

    for dep in map(Requirement, deps):
        if dep.name in pins:
            assert dep.specifier.contains(pins[dep.name]), (dep, pins[dep.name])


def test_process_plan_is_the_compose_services_with_loopback_addresses(tmp_path):
    """Without starting anything: each planned process is its compose service's command and environment."""
    topo = ProcessTopology(tmp_path, name="em_plan_check", workers=3)
    specs = compose()["services"]
    where = topo.addresses
    plan = topo.plan()
    assert sorted({p.service for p in plan}) == sorted(s.name for s in SERVICES if s.runs_as == "process")
    assert sum(p.service == "dask-worker" for p in plan) == 3
    for launch in plan:
        svc, spec = service(launch.service), specs[launch.service]

        convert = compose_to_process(where, topo.settings)

        assert Path(launch.argv[0]).name == DEBIAN_NAMES.get(spec["command"][0], spec["command"][0])
        extra = list(process_only_args(launch.service, "127.0.0.1"))
        assert list(launch.argv[1:]) == [convert(a, command=True) for a in spec["command"][1:]] + extra, (
            launch.label
        )
        for key, value in spec.get("environment", {}).items():
            if key not in svc.compose_only_env:
                expected = convert(value)
                if launch.service == "user-code" and key in ("EM_CATALOG_URL", "PGPASSWORD"):
                    # as processes the code server starts the runs: it holds their role, as the daemon does
                    expected = topo.platform_env[key]
                    assert "_runs@" in topo.platform_env["EM_CATALOG_URL"]
                assert launch.env[key] == expected, (launch.label, key)
        assert launch.cwd == (str(topo.dagster_home) if spec.get("working_dir") else str(REPO))
        if svc.image in IMAGE_ENV:  # the platform's images' ENV, here (not Prometheus's)
            assert launch.env.get("DAGSTER_HOME") == str(topo.dagster_home)


def test_templates_follow_compose_interpolation():
    settings = {"SET": "v", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $${SET} ${SET}", settings)
        == "v d  d ${SET} v"
    )
    with pytest.raises(MissingSetting, match="EMPTY: set it"):
        interpolate("${EMPTY:?set it}", settings)
    assert interpolate("${EMPTY?unused}", settings) == ""
    where = compose_addresses()
    assert (
        place("tcp://{addr:dask-scheduler} {bind}:{port}", where, "user-code")
        == "tcp://dask-scheduler:8786 0.0.0.0:4000"
    )


def _secrets(**changed: str) -> dict[str, str]:
    """A real-looking value for every secret, with ``changed`` ones replaced."""
    from em_platform.deploy.services import SECRETS

    return {**{name: f"{name[:2]}-{i}fQ2x{i}" for i, name in enumerate(SECRETS)}, **changed}


@pytest.mark.parametrize(
    "secrets,refused",
    [
        (_secrets(POSTGRES_PASSWORD="change-me", EM_BROKER_PASSWORD="x"), True),
        (_secrets(AWS_SECRET_ACCESS_KEY=""), True),
        (_secrets(EM_DB_RUNS_PASSWORD="change-me-db-runs"), True),
        (_secrets(EM_S3_VIEWER_SECRET_KEY=""), True),
        (_secrets(), False),
    ],
)
def test_placeholder_secrets_are_refused_before_the_stores_start(secrets, refused):
    """Issue 22: compose started with docker/.env.example's `change-me` secrets. The secrets-check service
    runs first (the stores and the broker wait for it to complete successfully) and fails on a placeholder."""
    spec = compose()["services"]

    def waits_for_the_check(name: str) -> bool:  # directly, or through a one-shot that does (broker-init)
        deps = spec[name].get("depends_on", {})
        if deps.get("secrets-check", {}).get("condition") == "service_completed_successfully":
            return True
        return any(
            c["condition"] == "service_completed_successfully" and waits_for_the_check(d)
            for d, c in deps.items()
        )

    for store in ("postgresql", "rabbitmq", "minio"):
        assert waits_for_the_check(store), store
    check = spec["secrets-check"]
    script = check["command"][0].replace("$$", "$")  # compose's escape of a literal $
    done = subprocess.run([*check["entrypoint"], script], env=secrets, capture_output=True, text=True)
    assert (done.returncode != 0) == refused, done.stderr
    if refused:
        assert "placeholder" in done.stderr
    example = dict(
        line.split("=", 1) for line in (REPO / "docker" / ".env.example").read_text().splitlines() if "=" in line
        and not line.startswith("#")
    )  # fmt: skip
    assert subprocess.run([*check["entrypoint"], script], env=example, capture_output=True).returncode != 0


def test_each_container_gets_only_the_secrets_it_uses():
    """Issues 36 and 50: the viewer's container received the S3 secret, both database passwords, the broker
    password and the neuPrint token though it only reads images; then every service's database password was
    the superuser's. Each container now holds only its own credentials: its database role's, its object-store
    user's, the broker's where it speaks STOMP; the superuser's and the store's root key stay with the stores
    and their one-shot set-ups; the daemon holds the runs' (it hands each run's container its environment)."""
    from em_platform.deploy.services import SECRETS

    def secrets_of(spec: dict) -> list[str]:
        named = {m for v in spec.get("environment", {}).values() for m in re.findall(r"\$\{(\w+)", str(v))}
        return sorted(named & set(SECRETS))

    held = {name: secrets_of(spec) for name, spec in compose()["services"].items()}
    db_roles = [
        f"EM_DB_{r}_PASSWORD" for r in ("DAGSTER", "LISTENER", "LIVE_QC", "CRYO_LIVE", "CODE", "RUNS")
    ]
    assert held == {
        "secrets-check": sorted(SECRETS),
        "postgresql": ["POSTGRES_PASSWORD"],
        "db-init": sorted(["POSTGRES_PASSWORD", *db_roles]),
        "broker-init": ["EM_BROKER_PASSWORD", "EM_SCOPE_BROKER_PASSWORD"],
        "rabbitmq": ["EM_BROKER_PASSWORD"],
        "cryo-live": ["EM_DB_CRYO_LIVE_PASSWORD"],
        "minio": ["AWS_SECRET_ACCESS_KEY"],
        "minio-init": ["AWS_SECRET_ACCESS_KEY", "EM_S3_RUNS_SECRET_KEY", "EM_S3_VIEWER_SECRET_KEY"],
        "dask-certs": [],
        "proxy-certs": [],
        "dask-scheduler": [],
        "dask-worker": ["EM_S3_RUNS_SECRET_KEY"],
        "user-code": ["EM_DB_CODE_PASSWORD", "EM_DB_DAGSTER_PASSWORD"],
        "webserver": ["EM_DB_DAGSTER_PASSWORD"],
        "daemon": [
            "EM_BROKER_PASSWORD",
            "EM_DB_DAGSTER_PASSWORD",
            "EM_DB_RUNS_PASSWORD",
            "EM_S3_RUNS_SECRET_KEY",
        ],
        "listener": ["EM_BROKER_PASSWORD", "EM_DB_LISTENER_PASSWORD"],
        "live-qc": ["EM_BROKER_PASSWORD", "EM_DB_LIVE_QC_PASSWORD"],
        "viewer": ["EM_S3_VIEWER_SECRET_KEY"],
        "door": [],
        "proxy": [],
        "metrics": ["EM_DB_CODE_PASSWORD", "EM_DB_DAGSTER_PASSWORD"],  # the sensors' reads and the runs
        "alertmanager": [],
        "prometheus": [],
    }, held


def test_the_code_server_webserver_and_door_answer_only_the_services_that_need_them():
    """Issue 50: the code server's gRPC (StartRun) and the webserver's GraphQL answered anyone on the one
    compose network. Networks now follow who talks to whom; the runs join the data network (the stack's name)."""
    from em_platform.deploy.compose import NETWORK

    spec = compose()
    members: dict[str, set[str]] = {}
    for name, svc in spec["services"].items():
        for net in svc["networks"]:
            members.setdefault(net, set()).add(name)

    def reaches(name: str) -> set[str]:
        return {m for net in spec["services"][name]["networks"] for m in members[net]} - {name}

    assert reaches("user-code") == {"webserver", "daemon", "postgresql"}
    assert reaches("webserver") == {"user-code", "daemon", "postgresql", "proxy", "viewer"}
    assert reaches("door") == {"proxy"}
    assert not reaches("prometheus") & {
        "user-code",
        "webserver",
        "daemon",
        "door",
    }  # it scrapes the data side
    for outsider in ("listener", "live-qc", "dask-worker", "dask-scheduler", "rabbitmq", "minio"):
        assert not reaches(outsider) & {"user-code", "webserver", "daemon", "door"}, outsider
    assert spec["networks"][NETWORK]["name"] == "${COMPOSE_PROJECT_NAME:-em-platform}"  # the runs' network
    assert not members[NETWORK] & {"user-code", "webserver", "daemon", "door", "proxy"}
