"""The container deployment as an attacker would try it (issue 50), against the real proxy, database and engine:
cross-site requests through the login, guessing passwords, the superuser's paths and a privileged run from
the containers of a listener and of a run with their own credentials, the viewer's key, the proxy's upstream
headers. Runs after the workload (a finished run is the attacker's template)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml

from tests.deploy.dagster_api import TERMINAL, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

MUTATION = 'mutation { terminateRun(runId: "none") { __typename } }'


def _through_proxy(stack, path: str, data: bytes | None = None, **headers: str):
    """(status, headers) of a request through the proxy as the logged-in admin, with ``headers`` added."""
    import base64

    user, password = stack.login
    sent = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    req = urllib.request.Request(stack.webserver + path, data=data, headers=sent)
    context = ssl.create_default_context(cafile=stack.cafile)
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_the_proxy_refuses_cross_site_control_through_the_login(stack):
    """A logged-in operator's browser attaches the login to every request to the UI's origin, whichever page
    sends it: each way a page of another origin can send a mutation is refused at the door."""
    body = json.dumps({"query": MUTATION}).encode()
    statuses = {
        "text/plain": _through_proxy(
            stack, "/graphql", body, Content_Type="text/plain; charset=application/json"
        ),
        "form, query in the URL": _through_proxy(
            stack,
            "/graphql?" + urllib.parse.urlencode({"query": MUTATION}),
            b"x=1",
            Content_Type="application/x-www-form-urlencoded",
        ),
        "GET": _through_proxy(stack, "/graphql?" + urllib.parse.urlencode({"query": MUTATION})),
        "JSON, another origin": _through_proxy(
            stack, "/graphql", body, Content_Type="application/json", Origin="https://evil.example"
        ),
        "JSON, the UI's origin": _through_proxy(
            stack, "/graphql", body, Content_Type="application/json", Origin=stack.webserver
        ),
    }
    assert {k: s for k, (s, _) in statuses.items()} == {
        "text/plain": 415,
        "form, query in the URL": 400,
        "GET": 405,
        "JSON, another origin": 403,
        "JSON, the UI's origin": 200,
    }
    for what, (_, headers) in statuses.items():  # on refusals too: the proxy's hardening
        assert headers["Strict-Transport-Security"].startswith("max-age="), what
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff", what
        assert "frame-ancestors 'none'" in headers.get_all("Content-Security-Policy"), what
        assert "Server" not in headers, what


def test_a_websocket_from_another_origin_is_refused_through_the_proxy(stack):
    import base64

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    user, password = stack.login
    login = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    url = stack.webserver.replace("https://", "wss://") + "/graphql"
    context = ssl.create_default_context(cafile=stack.cafile)
    with pytest.raises(InvalidStatus) as refused:
        connect(url, ssl=context, origin="https://evil.example", additional_headers=login, open_timeout=30)
    assert refused.value.response.status_code == 403
    with connect(
        url, ssl=context, origin=stack.webserver, additional_headers=login, subprotocols=["graphql-ws"]
    ) as ws:
        ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "connection_ack"


def _in_container(stack, service: str, script: str) -> dict:
    """Run ``script`` (it prints one JSON document) inside the running container of ``service``."""
    done = stack.stack.engine_cmd("exec", stack.container(service), "python", "-c", script, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# What a process holding a service's credentials tries; each attempt's outcome, for the host to judge.
_ATTACK = r"""
import json, os, socket
import psycopg2
from sqlalchemy.engine import make_url

out = {"env": sorted(k for k in os.environ if k in (
    "POSTGRES_PASSWORD", "DAGSTER_POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD"))}
url = make_url(os.environ["EM_CATALOG_URL"])

def attempt(db, statement, user=url.username, password=os.environ.get("PGPASSWORD")):
    try:
        conn = psycopg2.connect(host=url.host, port=url.port or 5432, dbname=db, user=user, password=password,
                                connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
        conn.close()
        return "allowed"
    except psycopg2.Error as exc:
        return str(exc).splitlines()[0]

db = url.database
out["run a program"] = attempt(db, "COPY (SELECT 1) TO PROGRAM 'id'")
out["read a server file"] = attempt(db, "SELECT pg_read_file('/etc/passwd')")
out["make a table"] = attempt(db, "CREATE TABLE evil (x int)")
out["become superuser"] = attempt(db, "ALTER ROLE CURRENT_USER SUPERUSER")
out["Dagster's database"] = attempt(os.environ.get("DAGSTER_POSTGRES_DB", "dagster"), "SELECT 1")
out["the superuser with its password"] = attempt("postgres", "SELECT 1", "postgres")

def reach(host, port):
    try:
        socket.create_connection((host, port), 5).close()
        return "reached"
    except OSError as exc:
        return type(exc).__name__

out["reach"] = {f"{h}:{p}": reach(h, p) for h, p in (("user-code", 4000), ("webserver", 3000), ("door", 3100))}
print(json.dumps(out))
"""


def test_a_listener_with_its_own_credentials_cannot_reach_the_host_or_the_control_plane(stack):
    out = _in_container(stack, "listener", _ATTACK)
    assert out["env"] == []  # no superuser's, Dagster's or the store's secret in its environment
    assert "pg_execute_server_program" in out["run a program"]
    assert "permission denied" in out["read a server file"]
    assert "permission denied" in out["make a table"]
    assert "must be superuser" in out["become superuser"]
    assert "permission denied for database" in out["Dagster's database"]
    assert "password authentication failed" in out["the superuser with its password"]
    assert set(out["reach"].values()) <= {"gaierror", "ConnectionRefusedError", "TimeoutError"}, out["reach"]


def _run_env(stack) -> list[str]:
    """``-e NAME=VALUE`` for what the daemon hands each run's container (docker/dagster.yaml's env_vars)."""
    from em_platform.deploy.images import DOCKER

    names = yaml.safe_load((DOCKER / "dagster.yaml").read_text())["run_launcher"]["config"]["env_vars"]
    info = json.loads(stack.stack.engine_cmd("inspect", stack.container("daemon"), check=True).stdout)[0]
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    return [arg for name in names if name in env for arg in ("-e", f"{name}={env[name]}")]


_PRIVILEGED_RUN = r"""
import json, os, uuid
from dagster import DagsterInstance
from dagster._core.events import DagsterEvent
from dagster._core.storage.dagster_run import DagsterRunStatus

instance = DagsterInstance.get()
template = next(r for r in instance.get_runs(limit=200) if r.job_code_origin and r.remote_job_origin)
asked = {"docker": {"container_kwargs": {"privileged": True, "volumes": ["/:/host"], "pid_mode": "host"}}}
repository = template.job_code_origin.repository_origin._replace(container_context=asked)
run = template._replace(
    run_id=str(uuid.uuid4()),
    status=DagsterRunStatus.QUEUED,
    job_code_origin=template.job_code_origin._replace(repository_origin=repository),
    tags={**template.tags, "em/attack": os.environ["EM_ATTACK_MARK"]},
)
instance.add_run(run)
instance.report_dagster_event(DagsterEvent.job_enqueue(run), run_id=run.run_id)
print(json.dumps({"run_id": run.run_id}))
"""


def test_a_run_with_its_credentials_cannot_get_a_privileged_container_or_the_superuser(stack, dagster_api):
    """A run's container holds Dagster's storage credentials (it writes its events) and the runs' catalog
    role. From one (a container of the run image on the runs' network with the daemon's run environment): the
    database's superuser paths are refused, the control plane is out of reach, and a queued run it writes
    whose origin asks for a privileged container with the host's / mounted is failed by the daemon, saying
    why, with no container made."""
    network = stack.stack.project
    image = stack.settings.get("EM_IMAGE") or "em-platform:latest"
    base = ["run", "--rm", "--network", network, *_run_env(stack), "--entrypoint", "python", image, "-c"]
    done = stack.stack.engine_cmd(*base, _ATTACK, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        "pg_execute_server_program" in out["run a program"] and "must be superuser" in out["become superuser"]
    )
    assert "password authentication failed" in out["the superuser with its password"]
    assert set(out["reach"].values()) <= {"gaierror", "ConnectionRefusedError", "TimeoutError"}, out["reach"]

    mark = uuid.uuid4().hex[:8]
    done = stack.stack.engine_cmd(
        *base[:-4], "-e", f"EM_ATTACK_MARK={mark}", *base[-4:], _PRIVILEGED_RUN, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    [run, *retries] = dagster_api.wait_runs_done({"em/attack": mark}, 1, 600)[::-1]
    assert run["runId"] == run_id and run["status"] == "FAILURE", run
    errors = dagster_api.query(
        """query E($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
             ... on EngineEvent { message error { message } } } } } }""",
        {"id": run_id},
    )["logsForRun"]["events"]
    said = " ".join((e.get("error") or {}).get("message", "") for e in errors if e)
    assert "run not launched" in said and "privileged" in said, errors
    for attempt in [run, *retries]:
        assert attempt["status"] in TERMINAL
        made = stack.stack.engine_cmd(
            "ps", "-a", "-q", "--filter", f"label=dagster/run_id={attempt['runId']}"
        )
        assert made.stdout.strip() == "", f"a container was made for {attempt['runId']}"


def test_the_viewers_key_only_reads_the_store(stack):
    out = _in_container(
        stack,
        "viewer",
        r"""
import json, os, s3fs
fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["EM_S3_ENDPOINT_URL"]})
bucket = os.environ["EM_DATA_ROOT"].removeprefix("s3://").split("/")[0]
objects = fs.find(f"{bucket}/em")  # the workload's images
out = {"read": bool(objects) and isinstance(fs.cat(objects[0]), bytes)}
try:
    fs.pipe(f"{bucket}/em/evil.txt", b"x")
    out["write"] = "allowed"
except PermissionError as exc:
    out["write"] = "refused"
print(json.dumps(out))
""",
    )
    assert out == {"read": True, "write": "refused"}


def test_failed_logins_are_bounded_per_client(stack):
    """From a container of its own on the web network (an address of its own, so the host's tests stay
    unaffected): after 10 wrong passwords the right one waits too (429 with Retry-After)."""
    user, password = stack.login
    script = r"""
import base64, http.client, json, os, socket, ssl
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # a client of its own; the TLS is tested elsewhere
user, proxy = os.environ["EM_TEST_USER"], socket.gethostbyname("proxy")  # by address: the proxy's default name
def status(pw):
    conn = http.client.HTTPSConnection(proxy, 3000, context=ctx, timeout=30)
    conn.request("GET", "/server_info", headers={
        "Host": "localhost:3000", "Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, resp.getheader("Retry-After")
out = [status(f"guess-{i}")[0] for i in range(10)]
print(json.dumps({"guesses": out, "then the right one": status(os.environ["EM_TEST_PASSWORD"])}))
"""
    image = stack.settings.get("EM_IMAGE") or "em-platform:latest"
    done = stack.stack.engine_cmd(
        "run",
        "--rm",
        "--network",
        f"{stack.stack.project}-web",
        "-e",
        f"EM_TEST_USER={user}",
        "-e",
        f"EM_TEST_PASSWORD={password}",
        "--entrypoint",
        "python",
        image,
        "-c",
        script,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["guesses"] == [401] * 10
    status, retry_after = out["then the right one"]
    assert status == 429 and 0 < int(retry_after) <= 300
    with stack.get(f"{stack.webserver}/server_info") as resp:  # the host, another client, is let in
        assert resp.status == 200


_ECHO = r"""
import http.server, json
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(dict(self.headers.items())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 3000), Echo).serve_forever()
"""


def test_the_users_passwords_go_no_further_than_the_door(stack):
    """What the proxy sends the webserver, seen by a stand-in that echoes its request headers (the
    webserver stopped meanwhile): no Authorization header, the browser's address in X-Forwarded-For."""
    webserver = stack.container("webserver")
    stack.stack.engine_cmd("stop", "-t", "20", webserver, check=True)
    image = stack.settings.get("EM_IMAGE") or "em-platform:latest"
    echo = f"emtest-echo-{uuid.uuid4().hex[:6]}"
    try:
        stack.stack.engine_cmd(
            "run",
            "-d",
            "--rm",
            "--name",
            echo,
            "--network",
            f"{stack.stack.project}-web",
            "--network-alias",
            "webserver",
            "--entrypoint",
            "python",
            image,
            "-c",
            _ECHO,
            check=True,
        )

        def echoed():
            try:
                with stack.get(f"{stack.webserver}/headers") as resp:
                    return json.load(resp)
            except (urllib.error.HTTPError, OSError):
                return None

        seen = wait_until(echoed, 120, "the echoing stand-in behind the proxy", 1.0)
        assert not {k.lower() for k in seen} & {"authorization", "proxy-authorization"}, seen
        assert seen.get("X-Forwarded-For") and seen.get("Host", "").startswith("127.0.0.1:")
    finally:
        stack.stack.engine_cmd("rm", "-f", echo)
        stack.stack.engine_cmd("start", webserver, check=True)
        stack.wait_back("webserver", timeout=300)


def test_the_broker_refuses_a_message_over_its_bound(stack):
    """RabbitMQ's max_message_size (docker/rabbitmq/40-limits.conf), the listener's own bound too: a SEND of
    16 MiB + 1 byte from the microscope's user is answered with an ERROR frame and nothing is queued."""
    import stomp

    from em_platform.tem.stomp_connection import drop_connection, use_tls

    s = stack.settings
    where = ("127.0.0.1", int(s["EM_BROKER_PORT"]))
    conn, heard = stomp.Connection([where]), {"error": [], "ok": []}
    use_tls(conn, stack.machine.stomp_tls, where)

    class Frames(stomp.ConnectionListener):
        def on_error(self, frame):
            heard["error"].append(f"{frame.headers.get('message')} {frame.body}")

        def on_receipt(self, frame):
            heard["ok"].append(frame.headers["receipt-id"])

    conn.set_listener("frames", Frames())
    conn.connect(s["EM_SCOPE_BROKER_USERNAME"], s["EM_SCOPE_BROKER_PASSWORD"], wait=True)
    try:
        topic = f"{s.get('EM_BROKER_TOPIC_PREFIX') or '/topic/'}tile.raw"
        conn.send(topic, b"x" * ((16 << 20) + 1), receipt="big")
        wait_until(lambda: heard["error"] or heard["ok"], 120, "the broker's answer to a 16 MiB + 1 message")
        assert heard["ok"] == [] and any("larger than configured max size" in e for e in heard["error"]), (
            heard
        )
    finally:
        if conn.is_connected():
            conn.disconnect()
        drop_connection(conn)
