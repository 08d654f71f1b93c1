"""`em-platform dev` (what `make dev` runs): `dagster dev` that stops on SIGTERM and logs only what happened.

Two things plain `dagster dev` gets wrong for an operator here: started in the background from a script
(`make dev &`), it inherits an ignored SIGINT and then ignores SIGTERM too, hanging until killed; and the
daemon logs every sensor tick, so a 5-second montage sensor fills the log with "nothing new". This wrapper
starts `dagster dev` with SIGINT restored, turns its own SIGTERM/SIGINT into the SIGINT `dagster dev` shuts
down on (waiting SHUTDOWN_GRACE_SECONDS for it, then killing its process group: a daemon busy launching
a run or finishing a tick can take 20 s on a loaded machine, and a killed run is failed and retried by run
monitoring on the next start), and drops the daemon's lines for sensor ticks that found nothing and the
runs' DEBUG events (the terminal logs at INFO). Everything else `dagster dev` prints passes through.

Beside Dagster it supervises (restarts when they die, stops when it stops) the platform's warm services:
the live-QC service (`em-platform live-qc`, threads of its own for live tiles), the live cryo service
(`em-platform cryo-live`, each single-particle exposure as it lands), the image viewer
(`em-platform viewer`: Neuroglancer on EM_VIEWER_URL, which every image's link opens) and one Dask pool that
every run computes on (ingests, fusion, cryo; :class:`DaskPool`), instead of a cluster started per run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from em_platform.deploy.dask_tls import security, tls_env
from em_platform.deploy.processes import free_port, service_child, signal_group
from em_platform.quiet_dask import QUIET_DASK_ENV
from em_platform.stop_signals import on_stop_signal, restore

# Daemon lines for sensor ticks that request nothing (dagster/_daemon/sensor.py), and the event-log consumer's
# first start on a new Dagster home ("No cursor for event type ..., ignoring older events": nothing is older).
QUIET_TICK = re.compile(
    r"Checking for new runs for sensor: |No run requests returned for \S+, skipping|Sensor \S+ skipped: "
    r"|EventLogConsumerDaemon - .*No cursor for event type"
)
SHUTDOWN_GRACE_SECONDS = 12.0
# where the services serve their metrics unless EM_LIVE_QC_METRICS / EM_METRICS say otherwise
DEV_LIVE_QC_METRICS = "127.0.0.1:9470"
DEV_FACILITY_METRICS = "127.0.0.1:9472"
DEV_CRYO_LIVE_METRICS = "127.0.0.1:9473"
# Dagster 1.13 warns that `dagster dev` is superseded by `dg dev` (the dagster-dg-cli package), which serves a dg
# project (pyproject's [tool.dg] and its defs layout); this repository is a plain code location that
# workspace.yaml names, so `dagster dev` is still the command that serves it. The warning, which the user cannot
# act on, is left out (a FutureWarning; the filter names its message, nothing else is hidden).
_NOT_DG = ",".join(
    filter(
        None,
        [os.environ.get("PYTHONWARNINGS", ""), "ignore:Function `dev_command` is superseded:FutureWarning"],
    )
)


# A run's DEBUG events (every step's start, output and handled input: 176 of 364 lines for the demo's runs)
# stay in its event log in the UI; the terminal shows INFO and above.
DEBUG_LINE = re.compile(r" - DEBUG - ")


# The asset daemon logs seven lines a tick (about every 30 s) from "Checking ..." to "Finished ... tick"; a tick
# that submits no run said nothing worth a line.
ASSET_DAEMON = re.compile(r"dagster\.daemon\.AssetDaemon - ")
ASSET_TICK_END = re.compile(r"Finished auto-materialization tick")
EMPTY_ASSET_TICK = re.compile(r"Submitting 0 runs for evaluation")


def quiet_lines(lines: Iterable[str]) -> Iterable[str]:
    """The lines worth showing: sensor and asset-daemon ticks that started nothing and runs' DEBUG events are
    left out (an asset-daemon tick's lines are held until its end says whether it started a run)."""
    tick: list[str] = []
    for line in lines:
        if QUIET_TICK.search(line) or DEBUG_LINE.search(line):
            continue
        if ASSET_DAEMON.search(line):
            tick.append(line)
            if ASSET_TICK_END.search(line):
                if not any(EMPTY_ASSET_TICK.search(held) for held in tick):
                    yield from tick
                tick = []
            continue
        yield line
    yield from tick  # a tick cut short by the stop


def _restore_sigint() -> None:  # runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_dev(workspace: str, host: str, port: int, out=sys.stdout) -> int:
    """Run `dagster dev` until it exits or this process gets SIGTERM/SIGINT; its exit status."""
    # `dagster dev` whose webserver is behind the guard: a loopback UI is reachable from every page the
    # operator's browser opens (em_platform/webserver.py)
    # started in the Dagster home, the workspace named by its path: `dagster dev` warns of a dagster.yaml in its
    # working directory that is not DAGSTER_HOME's, and the checkout's top holds the embedded default one
    workspace = os.path.abspath(workspace)
    home = os.environ.get("DAGSTER_HOME") or None
    cmd = [sys.executable, "-m", "em_platform.webserver", "dev", "-w", workspace, "-h", host, "-p", str(port)]
    create_instance_storage()
    pool = DaskPool.start(out) if not os.environ.get("DASK_SCHEDULER_ADDRESS") else None
    print(
        f"em-platform dev: Dagster UI on http://{host}:{port} (DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '?')}); "
        "sensor ticks that find nothing are not logged; Ctrl-C or SIGTERM stops it",
        file=out,
        flush=True,
    )
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        preexec_fn=_restore_sigint,
        start_new_session=True,
        cwd=home,
        env={**os.environ, **(pool.env if pool else {}), "PYTHONWARNINGS": _NOT_DG},
    )
    stopping = threading.Event()
    # the services' metrics on loopback, for a Prometheus of the operator's (docs/operations.md)
    live_metrics = os.environ.get("EM_LIVE_QC_METRICS", "").strip() or DEV_LIVE_QC_METRICS
    facility_metrics = os.environ.get("EM_METRICS", "").strip() or DEV_FACILITY_METRICS
    cryo_metrics = os.environ.get("EM_CRYO_LIVE_METRICS", "").strip() or DEV_CRYO_LIVE_METRICS
    print(
        f"em-platform dev: metrics of live-qc at http://{live_metrics}/metrics (EM_LIVE_QC_METRICS), of "
        f"cryo-live at http://{cryo_metrics}/metrics (EM_CRYO_LIVE_METRICS), of the facility at "
        f"http://{facility_metrics}/metrics (EM_METRICS)",
        file=out,
        flush=True,
    )
    services = [
        Supervised(
            "live-qc",
            [sys.executable, "-m", "em_platform.live_qc_cli"],
            out,
            env={**os.environ, "EM_LIVE_QC_METRICS": live_metrics},
        ),
        Supervised(
            "cryo-live",
            [sys.executable, "-m", "em_platform.cli", "cryo-live"],
            out,
            env={**os.environ, "EM_CRYO_LIVE_METRICS": cryo_metrics},
        ),
        Supervised("viewer", [sys.executable, "-m", "em_platform.cli", "viewer"], out),
        Supervised(
            "metrics",
            [sys.executable, "-m", "em_platform.cli", "metrics"],
            out,
            env={**os.environ, "EM_METRICS": facility_metrics},
        ),
    ]
    supervised = services + (pool.services if pool else [])

    def stop(signum: int) -> None:  # in a thread of its own (em_platform.stop_signals), once
        stopping.set()
        for service in supervised:  # from now on nothing is restarted, whatever exits
            service.halt()
        print(f"em-platform dev: {signal.Signals(signum).name}: stopping", file=out, flush=True)
        _shut_down(child, out)

    previous = on_stop_signal(stop)
    try:
        return _serve(child, out, stopping)
    finally:
        for service in supervised:  # the pool's workers before its scheduler
            service.stop()
        print(
            "em-platform dev: stopped (Dagster, live-qc, cryo-live, viewer, metrics"
            + (", the Dask pool)" if pool else ")"),
            file=out,
            flush=True,
        )
        restore(previous)


def create_instance_storage() -> None:
    """Create the Dagster instance's storage (on a new home: its SQLite files, tables and schema stamps) before
    the processes that open it start together. Two first opens at once (`dagster dev`'s and the metrics
    exporter's) can stamp one file's schema twice, and every later open then fails ("more than one head")."""
    import dagster as dg

    with dg.DagsterInstance.get():
        pass


class Supervised:
    """A service of the platform beside Dagster (``cmd``), restarted if it dies, stopped with SIGTERM when
    `make dev` stops (and by the kernel if this process is killed). Its lines go to the log, but those
    ``quiet`` matches (routine INFO chatter)."""

    RESTART_SECONDS = 2.0
    REFUSED = 2  # the exit status of a service that refuses its settings (a taken port): not restarted

    def __init__(
        self,
        name: str,
        cmd: list[str],
        out,
        quiet: re.Pattern | None = None,
        env: dict[str, str] | None = None,
        quiet_at_stop: re.Pattern | None = None,
    ):
        self.name, self.cmd, self.out, self.quiet, self.env = name, cmd, out, quiet, env
        self.quiet_at_stop = quiet_at_stop  # lines that are the stop itself, once the stop has begun
        self.stopping = threading.Event()  # set: never restarted again (the stop has begun)
        self._stopped = False
        self.proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._supervise, name=name, daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                text=True,
                errors="replace",
                preexec_fn=service_child,
                # a group of its own: a terminal's Ctrl-C (SIGINT to its foreground group) reaches only `make
                # dev`, which stops the services in order (Dask's workers before their scheduler)
                start_new_session=True,
            )
            hidden = False
            assert self.proc.stdout is not None  # stdout=PIPE
            for line in self.proc.stdout:
                if hidden and TRACEBACK_PART.match(line):
                    continue  # the traceback of a record left out goes with it
                hidden = self._quiet(line)
                if not hidden:
                    self.out.write(line)
                    self.out.flush()
            status = self.proc.wait()
            if self.stopping.wait(0):
                return
            if status == self.REFUSED:
                print(
                    f"em-platform dev: {self.name} refused its settings (see above); not restarted",
                    file=self.out,
                    flush=True,
                )
                return
            print(
                f"em-platform dev: {self.name} exited ({status}); restarting in {self.RESTART_SECONDS:g} s",
                file=self.out,
                flush=True,
            )
            self.stopping.wait(self.RESTART_SECONDS)

    def _quiet(self, line: str) -> bool:
        if self.quiet is not None and self.quiet.search(line):
            return True
        return (
            self.quiet_at_stop is not None
            and self.stopping.is_set()
            and bool(self.quiet_at_stop.search(line))
        )

    def halt(self) -> None:
        """No restart from now on (the process is stopped by :meth:`stop`)."""
        self.stopping.set()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SHUTDOWN_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc is not None:
            # and its children, in its group: `dask worker`'s worker processes can outlive the command by a
            # moment, and a worker still there when the scheduler stops next logs a failed heartbeat
            deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # poll: a process group has no handle to wait on
            signal_group(self.proc.pid, signal.SIGKILL)
        self._thread.join(5)


# The lines of a traceback after a log record's first line. Dask logs some routine INFO records with one (a
# worker's connection closed at our stop: distributed.batched's "Batched Comm Closed"): left out with the record.
TRACEBACK_PART = re.compile(
    r"\s|$|Traceback \(most recent call last\)|The above exception|During handling of the above|[\w.]+: "
)
DASK_INFO = re.compile(r" - INFO - ")  # Dask's routine lines (workers joining, tasks' plugins); warnings pass
# The worker command gives each worker 8 s to close on SIGTERM, then its nanny kills it and warns. A batch
# worker's session runs at autogroup nice 19 (cluster/batch_priority.py): on a busy machine it may not get the
# CPU to close in time. At our stop that kill is the stop finishing (nothing of a run is held by a worker: a
# run's results are in storage), not something the user can act on.
# A worker closing at our SIGTERM is dropped by the scheduler, which closes its connection: a heartbeat then in
# flight fails ("Failed to communicate with scheduler during heartbeat", with the closed stream's traceback).
WORKER_STOP_NOISE = re.compile(
    r"Worker process still alive after [\d.]+ seconds, killing"
    r"|Failed to communicate with scheduler during heartbeat"
)


@dataclass
class DaskPool:
    """One Dask scheduler and its workers on loopback, shared by every run `make dev` launches (Dagster's runs
    get ``DASK_SCHEDULER_ADDRESS``): warm, sized to the machine (a worker process per core, one thread each,
    memory shared out among them), and doing its batch work at nice 10 in a session at autogroup nice 19, its
    task threads at ``SCHED_IDLE`` (the ``batch_niceness`` preload), so the live-QC service's own threads get
    the cores first. It speaks TLS only, with certificates of its own (``$DAGSTER_HOME/dask-certs``): on
    loopback any local user could otherwise send it code to run as the operator. Not started when
    ``DASK_SCHEDULER_ADDRESS`` already names a cluster."""

    address: str
    scheduler: Supervised
    workers: Supervised
    tls: dict[str, str] = field(default_factory=dict)  # Dask's TLS settings, for its processes and clients

    @classmethod
    def start(cls, out, dask_env: Mapping[str, str] = QUIET_DASK_ENV, certs: Path | None = None) -> DaskPool:
        """``dask_env``: Dask settings for its processes, under any the environment sets itself (by default
        :data:`QUIET_DASK_ENV`: idle, a seventh of Dask's defaults' CPU; bench_dask_idle compares with none);
        ``certs``: where its TLS certificates are kept (default ``$DAGSTER_HOME/dask-certs``)."""
        port = free_port()
        address = f"tls://127.0.0.1:{port}"
        python = sys.executable
        home = os.environ.get("DAGSTER_HOME") or os.path.expanduser("~/.em_platform")
        tls = tls_env(certs or Path(home) / "dask-certs")
        env = {**dask_env, **os.environ, **tls}
        scheduler = Supervised(
            "dask-scheduler",
            [
                python,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            out,
            DASK_INFO,
            env,
        )
        workers = Supervised(
            "dask-worker",
            [
                python,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nworkers",
                str(os.cpu_count() or 1),
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
                "--preload",
                "em_platform.deploy.batch_niceness",
            ],
            out,
            DASK_INFO,
            env,
            quiet_at_stop=WORKER_STOP_NOISE,
        )
        print(
            f"em-platform dev: Dask pool for every run at {address} ({os.cpu_count()} worker processes, "
            "batch work at nice 10 on SCHED_IDLE task threads, each worker's session at autogroup nice 19)",
            file=out,
            flush=True,
        )
        return cls(address, scheduler, workers, tls)

    @property
    def env(self) -> dict[str, str]:
        """What a client of the pool needs: its address and its TLS."""
        return {"DASK_SCHEDULER_ADDRESS": self.address, **self.tls}

    def security(self):
        """A Dask client's security for the pool (tests, tools)."""
        return security(self.tls)

    @property
    def services(self) -> list[Supervised]:
        return [self.workers, self.scheduler]

    def stop(self) -> None:
        self.workers.stop()
        self.scheduler.stop()


def _serve(child: subprocess.Popen, out, stopping: threading.Event | None = None) -> int:
    """Relay `dagster dev`'s log until it exits, then stop what it left running; its exit status.

    Not until its log ends: a run its code server started outlives it and holds the log pipe, and so held
    `make dev` after Ctrl-C for as long as the run took (a docs test saw a run retrying a download keep it
    up 30 s; an ingest could keep it up for hours)."""
    relay = threading.Thread(
        target=_relay, args=(child.stdout, out, stopping), name="dagster-log", daemon=True
    )
    relay.start()
    status = child.wait()
    _stop_left_behind(child.pid, out)
    relay.join(timeout=5)  # the rest of the log, now that nothing holds the pipe
    if status == -signal.SIGKILL:
        print("em-platform dev: Dagster services killed", file=out, flush=True)
    return status


def _relay(lines: Iterable[str], out, stopping: threading.Event | None = None) -> None:
    for line in without_shutdown_race(quiet_lines(lines), stopping or threading.Event()):
        out.write(line)
        out.flush()


# `dagster dev` stops its code server while the daemon may be in a sensor tick: the tick then fails with a
# traceback ending in "Location em_platform does not exist in workspace". Only while stopping, that is the
# stop's own doing, not a fault.
_LOCATION_GONE = re.compile(r"DagsterCodeLocationNotFoundError: Location \S+ does not exist in workspace")
_DAEMON_ERROR = re.compile(r"dagster\.daemon\.\w+ - .*ERROR")


def without_shutdown_race(lines: Iterable[str], stopping: threading.Event) -> Iterable[str]:
    """The lines, but for a daemon's error and its traceback about the code location it lost to the stop
    (see above); an error block is held until its last line says which it is."""
    held: list[str] = []
    for line in lines:
        if len(held) == 1 and not line.startswith("Traceback"):  # an error without a traceback
            yield held.pop()
        if held:
            held.append(line)
            if not line.startswith(("Traceback", " ", "\t")):  # the exception's own line ends the block
                if not (stopping.is_set() and _LOCATION_GONE.search(line)):
                    yield from held
                held = []
            continue
        if _DAEMON_ERROR.search(line):
            held = [line]
            continue
        yield line
    yield from held


def _stop_left_behind(group: int, out) -> None:
    """SIGTERM to the runs left in `dagster dev`'s process group after it exited (Dagster fails an interrupted
    run and run_retries re-runs it at the next start), named; SIGKILL after the grace. Without runs, what is
    left (a code server still closing, slowly on a loaded host) is given the grace to finish by itself, then
    killed without a word: a SIGTERM would reach it as a KeyboardInterrupt inside its own exit and print a
    traceback."""
    if not _group_alive(group):
        return
    runs = run_ids_in_group(group)
    if runs:
        print(
            f"em-platform dev: stopping the run(s) Dagster left running: {', '.join(runs)} (failed now, re-run at "
            "the next start)",
            file=out,
            flush=True,
        )
        signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll: a process group has no handle to wait on
    signal_group(group, signal.SIGKILL)


_RUN_ID = re.compile(r'run_id\\*"\s*:\s*\\*"([0-9a-f-]{36})')


def run_ids_in_group(group: int) -> list[str]:
    """The Dagster runs executing in a process group (``dagster api execute_run`` and its kin carry the run's
    id in their serialized arguments); a run whose id cannot be read is named by its PID."""
    import psutil

    found: list[str] = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.info["pid"]) != group:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "execute_run" in cmdline or "execute_step" in cmdline:
            m = _RUN_ID.search(cmdline)
            found.append(m.group(1) if m else f"pid {proc.info['pid']}")
    return sorted(set(found))


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def _shut_down(child: subprocess.Popen, out) -> None:
    """SIGINT to `dagster dev` (it stops its webserver, daemon and code servers); its group is killed if it
    is not down within SHUTDOWN_GRACE_SECONDS."""
    child.send_signal(signal.SIGINT)
    try:
        child.wait(SHUTDOWN_GRACE_SECONDS)
        return
    except subprocess.TimeoutExpired:
        pass
    print(
        f"em-platform dev: Dagster not down {SHUTDOWN_GRACE_SECONDS:.0f} s after SIGINT: killing its processes "
        "(runs it was executing are failed and retried by run monitoring at the next start)",
        file=out,
        flush=True,
    )
    signal_group(child.pid, signal.SIGKILL)  # the group this wrapper started, by its id
