"""The images and the stack as `make images` and `make compose-up` leave them: one container per service,
each healthy; only the proxy (the UI and the viewer, over TLS, after a login) and the broker (STOMP over TLS,
after a login) published, and only on loopback; the Docker API socket in the daemon alone; the microscope's broker user kept to its topics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from em_platform.deploy.images import DOCKER, OFFICIAL_BASE, PYTHON_BASE, engine_env, image_exists
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
    with stack.get(f"{stack.webserver}/server_info") as resp:
        assert json.load(resp)["dagster_webserver_version"]
    published = {}
    test_only = {"postgresql", "minio", "dask-scheduler"}  # tests/compose/compose.test.yaml, for the tests
    for svc in SERVICES:
        for name in stack.stack.container_names(svc.name):
            bindings = _inspect(stack, name)["HostConfig"].get("PortBindings") or {}
            for port, hosts in bindings.items():
                for host in hosts or []:
                    published.setdefault(svc.name, []).append((host["HostIp"], port))
    assert set(published) - test_only == {"proxy", "rabbitmq"}, published
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


def _stomp(stack, user: str, password: str):
    """A STOMP connection to the published broker port (TLS), with the ERROR frames and receipts it gets."""
    import stomp

    from em_platform.tem.stomp_connection import use_tls

    where = ("127.0.0.1", int(stack.settings["EM_BROKER_PORT"]))
    conn, heard = stomp.Connection([where]), {"error": [], "ok": []}
    use_tls(conn, stack.machine.stomp_tls, where)  # a refusal closes the connection: its reader must end

    class Frames(stomp.ConnectionListener):
        def on_error(self, frame):
            heard["error"].append(frame.headers.get("message"))

        def on_receipt(self, frame):
            heard["ok"].append(frame.headers["receipt-id"])

    conn.set_listener("frames", Frames())
    conn.connect(user, password, wait=True)
    return conn, heard


def test_the_microscope_user_may_publish_only_its_topics_and_read_only_the_platforms_answers(stack):
    """RabbitMQ's own permissions (broker-init's definitions): the scope's user cannot forge a verdict or read
    another scope's tiles; it can subscribe to the verdicts; nobody logs in as RabbitMQ's default guest."""
    import stomp

    from em_platform.tem.stomp_connection import drop_connection
    from tests.deploy.dagster_api import wait_until

    s = stack.settings
    scope = (s["EM_SCOPE_BROKER_USERNAME"], s["EM_SCOPE_BROKER_PASSWORD"])
    attempts = {
        "forge a qc.status verdict": lambda c: c.send("/topic/qc.status", '{"status": "GOOD"}', receipt="r"),
        "read tile.raw": lambda c: c.subscribe("/topic/tile.raw", id="1", headers={"receipt": "r"}),
        "read qc.tile": lambda c: c.subscribe("/topic/qc.tile", id="1", headers={"receipt": "r"}),
    }
    outcome = {}
    for what, attempt in attempts.items():
        conn, heard = _stomp(stack, *scope)
        try:
            attempt(conn)
            wait_until(lambda h=heard: h["error"] or h["ok"], 30, f"the broker's answer to: {what}")
            outcome[what] = "refused" if heard["error"] == ["access_refused"] else "allowed"
        finally:
            if conn.is_connected():
                conn.disconnect()
            drop_connection(conn)
    assert outcome == {
        "forge a qc.status verdict": "refused",
        "read tile.raw": "refused",
        "read qc.tile": "allowed",
    }
    with pytest.raises(stomp.exception.ConnectFailedException):
        _stomp(stack, "guest", "guest")


def test_the_published_broker_port_speaks_only_tls_with_a_certificate_the_scope_can_check(stack, tmp_path):
    """The microscope reaches STOMP over TLS only: the broker's certificate chains to the CA `compose-ca
    --broker` prints, for 127.0.0.1 and localhost; plain STOMP, or TLS trusting another CA, gets no broker."""
    from em_platform.deploy.certificates import CA, make_certificates
    from em_platform.tem.stomp_connection import BrokerUnavailable, StompEvents, close_connection, open_stomp

    s, port = stack.settings, int(stack.settings["EM_BROKER_PORT"])
    scope = {"username": s["EM_SCOPE_BROKER_USERNAME"], "password": s["EM_SCOPE_BROKER_PASSWORD"]}
    for host in ("127.0.0.1", "localhost"):
        events = StompEvents()
        close_connection(open_stomp(host, port, events, tls=stack.machine.stomp_tls, **scope), events)
    with pytest.raises(BrokerUnavailable) as plain:
        open_stomp("127.0.0.1", port, StompEvents(), timeout=5, **scope)
    make_certificates(tmp_path / "other", ("localhost",), common_name="not the broker's")
    with pytest.raises(BrokerUnavailable, match="certificate verify failed") as stranger:
        open_stomp("127.0.0.1", port, StompEvents(), tls=str(tmp_path / "other" / CA), timeout=5, **scope)
    assert "EM_BROKER_TLS" in str(plain.value) and "EM_BROKER_TLS" in str(stranger.value)


def test_the_ui_and_the_viewer_answer_only_over_tls_after_a_login(stack):
    """The proxy is their one door: its certificate chains to its CA for 127.0.0.1 and localhost; no login or a
    wrong password gets 401 and nothing of the UI; plain HTTP gets no page; a user added with `ui-user` (as the
    deployment page says) gets in."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    for base, path in ((stack.webserver, "/server_info"), (stack.viewer, "/v/em/")):
        for auth in (False, ("admin", "not-the-password")):
            with pytest.raises(urllib.error.HTTPError) as refused:
                stack.get(base + path, auth=auth)
            assert refused.value.code == 401 and not refused.value.read().strip(), base
        for host in ("127.0.0.1", "localhost"):
            with stack.get(base.replace("127.0.0.1", host) + path) as resp:
                assert resp.status == 200, (base, host)
        with pytest.raises(urllib.error.HTTPError) as plain:  # plain HTTP to the TLS port: no page
            urllib.request.urlopen(base.replace("https://", "http://") + path, timeout=10)
        assert plain.value.code == 400
    user = ["ui-user", "curator", "--password-stdin", "--env-file", str(stack.stack.env_file)]
    added = subprocess.run(
        [sys.executable, "-m", "em_platform.deploy", *user],
        input="a-curator-password\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    with stack.get(f"{stack.webserver}/server_info", auth=("curator", "a-curator-password")) as resp:
        assert resp.status == 200


def test_prometheus_scrapes_every_service_and_answers_through_the_proxy_after_a_login(stack):
    """Issue 52: Prometheus (inside the stack's network, no port of its own) has every service with metrics
    up, its rules loaded; its UI and the facility's page are the proxy's, at /prometheus/, behind the login."""
    import urllib.error

    base = f"{stack.webserver}/prometheus"
    with pytest.raises(urllib.error.HTTPError) as refused:
        stack.get(f"{base}/api/v1/targets", auth=False)
    assert refused.value.code == 401
    jobs = {s.name for s in SERVICES if s.metrics}
    deadline = time.monotonic() + 180
    while True:
        with stack.get(f"{base}/api/v1/targets") as resp:
            health = {t["labels"]["job"]: t["health"] for t in json.load(resp)["data"]["activeTargets"]}
        if health == dict.fromkeys(jobs, "up"):
            break
        assert time.monotonic() < deadline, health
        time.sleep(2)  # polling Prometheus's scrapes (every 15 s), with a deadline
    with stack.get(f"{base}/api/v1/rules") as resp:
        rules = {r["name"] for g in json.load(resp)["data"]["groups"] for r in g["rules"]}
    assert {"ServiceDown", "ScopeSilent", "LiveQCLate"} <= rules
    with stack.get(f"{base}/consoles/facility.html") as resp:
        page = resp.read().decode()
    assert "The facility now" in page and "live-qc" in page


def test_the_dask_scheduler_speaks_only_tls_with_the_clusters_certificate(stack):
    """It runs whatever a client sends, on workers holding the S3 keys: a plain-TCP client gets nothing."""
    import warnings

    from distributed import Client
    from distributed.versions import VersionMismatchWarning

    with pytest.raises((OSError, TimeoutError)):
        Client(stack.scheduler.replace("tls://", "tcp://"), timeout="5s")
    with warnings.catch_warnings():  # the host's Python and packages are not the image's
        warnings.simplefilter("ignore", VersionMismatchWarning)
        with Client(stack.scheduler, timeout="30s", security=stack.dask_security()) as client:
            # a worker has no healthcheck: up may return before each has joined (its preload, its TLS)
            client.wait_for_workers(int(stack.settings["DASK_WORKERS"]), timeout=120)
            workers = client.scheduler_info()["workers"]
    assert len(workers) == int(stack.settings["DASK_WORKERS"])
    assert all(address.startswith("tls://") for address in workers)


_BUSY = """
import os, sys, time
start, end = {start}, {end}  # one window of wall-clock time, the same in every container


def cgroup_file(*names):
    \"\"\"The first of ``names`` this container's own cgroup has (v2's unified files, then v1's controllers).\"\"\"
    for name in names:
        if os.path.exists(name):
            return name
    sys.exit(f"no cgroup file of {{names}} in this container: its CPU weight and use cannot be read")


def used():
    \"\"\"This container's CPU seconds so far: its cgroup's, the service's own threads included.\"\"\"
    path = cgroup_file("/sys/fs/cgroup/cpu.stat", "/sys/fs/cgroup/cpuacct/cpuacct.usage",
                       "/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage")
    with open(path) as f:
        if path.endswith("cpu.stat"):
            return next(int(line.split()[1]) for line in f if line.startswith("usage_usec")) / 1e6
        return int(f.read()) / 1e9


# the weight the kernel holds for this container: v2's cpu.weight (1-10000) or v1's cpu.shares (2-262144)
with open(cgroup_file("/sys/fs/cgroup/cpu.weight", "/sys/fs/cgroup/cpu/cpu.shares",
                      "/sys/fs/cgroup/cpu,cpuacct/cpu.shares")) as f:
    weight = int(f.read())
if time.time() > start - 0.5:
    sys.exit("started too late: the window had opened")
for _ in range(len(os.sched_getaffinity(0))):  # a busy process per core in each container: more than the cores
    if os.fork() == 0:
        while time.time() < end + 1:
            pass
        os._exit(0)
time.sleep(start - time.time())  # waits for the window's instant, not for another process
before = used()
time.sleep(end - time.time())
print(weight, used() - before)
"""
WINDOW_S = 6
WINDOWS = 3  # at most, while other work on the host takes the cores the window needs


def _busy_window(stack, names: list[str]) -> list[tuple[int, float]]:
    """Every container of ``names`` busy on every core over the same window: (its kernel CPU weight, the CPU
    seconds its cgroup used in the window) for each."""
    opens = time.time() + 15  # every exec has started by then, even on a loaded machine
    script = _BUSY.format(start=opens, end=opens + WINDOW_S)
    busy = [
        subprocess.Popen(
            [stack.stack.tool, "exec", name, "python", "-c", script],
            env=engine_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    done = [p.communicate(timeout=120) for p in busy]
    assert all(p.returncode == 0 for p in busy), done
    return [(int(out.split()[0]), float(out.split()[1])) for out, _ in done]


def test_batch_workers_yield_the_cpu_to_the_live_qc_service(stack):
    """A container is a cgroup: the workers' nice values count only inside it, their CPU weight
    (DASK_WORKER_CPU_SHARES, 128 against everyone's 1024) between containers. The kernel holds that weight for
    each container; and with both sides busy on every core over one window, the live-QC container gets most of
    what both get. Each side is measured as its cgroup (whatever the live-QC service itself does counts for its
    container), over the same seconds. A window the host's other work crowds out (the containers together got
    under half the cores: seen in a loaded CI, 1.7 CPU seconds of 12) says nothing of the split between them,
    and is measured again."""
    workers = stack.stack.container_names("dask-worker")
    assert {_inspect(stack, w)["HostConfig"]["CpuShares"] for w in workers} == {128}
    assert _inspect(stack, stack.container("live-qc"))["HostConfig"]["CpuShares"] in (0, 1024)  # the default
    capacity = len(os.sched_getaffinity(0)) * WINDOW_S
    for window in range(1, WINDOWS + 1):
        (live_weight, live), *batch_side = _busy_window(stack, [stack.container("live-qc"), *workers])
        weights, batch = [w for w, _ in batch_side], [s for _, s in batch_side]
        print(
            f"window {window}: CPU seconds in {WINDOW_S} s on {capacity // WINDOW_S} cores: live-qc {live:.2f} "
            f"(weight {live_weight}), batch workers {[round(s, 2) for s in batch]} (weights {weights})"
        )
        # v2's cpu.weight 39 against 5, v1's cpu.shares 1024 against 128
        assert all(live_weight >= 4 * w for w in weights), (live_weight, weights)
        if live + sum(batch) >= capacity / 2:
            break
    else:
        print(
            "every window crowded out by the host's other work: the split is not judged, the kernel's weights are"
        )
        return
    # weights 1024 : 2 × 128 give the live side 80 % of what both get (4×); half that margin still tells,
    # and equal weights would give it a third (0.5×)
    assert live > 2 * sum(batch), (live, batch)
    assert sum(batch) > 0.2, batch  # slower, not stopped
