"""A real single-node SLURM on this machine for tests (no Dagster here): munged, slurmctld and slurmd of its own.

``LocalSlurm(folder)`` writes a slurm.conf of its own into ``folder`` (a cluster name, loopback ports and a
munge key of its own, so it never meets a facility's SLURM or a system munged running on the same host), starts
the three daemons and waits until the node is idle; ``stop()`` ends them and every job step they left. Clients
(sbatch, squeue, scancel, scontrol, and dask-jobqueue, which calls sbatch/scancel) reach it through the
environment of ``env`` (``SLURM_CONF``). Each finished job's state is recorded by SLURM itself in the
jobcomp/filetxt file (``job_records()``), which needs no accounting database.

SLURM's own limits: time limits are whole minutes (``--time=00:00:01`` is one minute) and slurmctld looks for
jobs past their limit every 30 s (a constant of slurmctld, counted from its start), so a job's own walltime
ends it 60 to 90 s after it started whatever the configuration (``OverTimeLimit=0`` and ``KillWait=2`` keep it
from taking longer). ``end_walltime_now(job)`` moves a running job's end to now: TIMEOUT within 30 s, by the
same code path.

Needs root (slurmd starts jobs as their user) and Debian's slurm-wlm and munge (``make slurm-engine``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.support.polling import wait_until
from tests.support.ports import free_ports

# Debian puts the daemons in /usr/sbin, which a non-login PATH may lack
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
PARTITION = "debug"
MEMORY_MARGIN_MB = 512  # RealMemory is the machine's memory less this (and less 5 %): slurmd never finds less
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

T = TypeVar("T")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def is_available() -> tuple[bool, str]:
    """(True, "") when a LocalSlurm can run here; else False and what is missing, and how to get it."""
    missing = [name for name in ("slurmctld", "slurmd", "munged", "sbatch") if _which(name) is None]
    reasons = []
    if missing:
        reasons.append(
            f"{', '.join(missing)} not installed (as root: `make slurm-engine`, i.e. apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        reasons.append("not root (slurmd starts each job as its user, and only root may do that)")
    return (not reasons, "; ".join(reasons))


def _machine_memory_mb() -> int:
    """MemTotal, or a smaller memory cgroup limit of this process, in MiB."""
    total = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) // 1024
    assert total, "no MemTotal in /proc/meminfo"
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text) // 2**20)
    return total


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path.name})"
    return f"--- last lines of {path}:\n" + "\n".join(text[-lines:])


class SlurmError(RuntimeError):
    pass


class LocalSlurm:
    """A single-node SLURM whose configuration, state, spool, logs and munge key live in ``folder``.

    The munge socket and slurmd's spool (job step sockets) are in a short folder of their own under the system's
    temporary folder: munged wants every folder above its socket open to all, and a unix socket path has at
    most 107 characters.
    """

    def __init__(self, folder: Path, partition: str = PARTITION) -> None:
        self.folder = Path(folder)
        self.partition = partition
        self.cluster = f"emtest{uuid.uuid4().hex[:8]}"  # lower case: SLURM's rule for cluster names
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.jobcomp = self.folder / "jobcomp.txt"
        self.cpus = os.cpu_count() or 1
        self.memory_mb = int(_machine_memory_mb() * 0.95) - MEMORY_MARGIN_MB
        self.ctld_port = self.slurmd_port = 0
        self.runtime: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self.started_in: float | None = None  # seconds from start() to an idle node

    # ---- paths -----------------------------------------------------------------------------------------------
    def log(self, daemon: str) -> Path:
        """The daemon's own log file (what it writes; its console output is in <daemon>.console.log)."""
        return self.folder / f"{daemon}.log"

    @property
    def munge_socket(self) -> Path:
        assert self.runtime is not None, "not started"
        return self.runtime / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment variables a client (sbatch, squeue, dask-jobqueue) needs to reach this SLURM."""
        path = os.environ.get("PATH", "")
        extra = [d for d in SBIN if d not in path.split(os.pathsep)]
        return {"SLURM_CONF": str(self.conf), "PATH": os.pathsep.join([path, *extra]).strip(os.pathsep)}

    def client_environ(self) -> dict[str, str]:
        """os.environ without a surrounding SLURM job's variables (SLURM_JOB_ID...), plus ``env``."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        environ.update(self.env)
        return environ

    # ---- configuration ---------------------------------------------------------------------------------------
    def slurm_conf(self) -> str:
        f = self.folder
        return "\n".join(
            [
                f"ClusterName={self.cluster}",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={self.ctld_port}",
                f"SlurmdPort={self.slurmd_port}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge_socket}",
                f"StateSaveLocation={f / 'state'}",
                f"SlurmdSpoolDir={self.runtime / 'spool'}",
                f"SlurmctldPidFile={f / 'slurmctld.pid'}",
                f"SlurmdPidFile={f / 'slurmd.pid'}",
                f"SlurmctldLogFile={self.log('slurmctld')}",
                f"SlurmdLogFile={self.log('slurmd')}",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                # no cgroups: jobs are tracked by their process tree, nothing is confined
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MpiDefault=none",
                "SwitchType=switch/none",
                # each finished job's state, written by slurmctld (no slurmdbd needed)
                "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={self.jobcomp}",
                "SchedulerType=sched/backfill",
                # a batch job starts on the scheduler's next 1 s tick, not 3 s later (batch_sched_delay=3)
                "SchedulerParameters=batch_sched_delay=0",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "DefMemPerCPU=256",  # a job without --mem would otherwise hold all the node's memory
                "ReturnToService=2",
                "MinJobAge=5",  # squeue forgets a finished job some 10 s after its end (default 300 s)
                "KillWait=2",  # SIGTERM to SIGKILL of a cancelled or timed-out job
                "OverTimeLimit=0",
                "InactiveLimit=0",
                "SlurmdTimeout=300",
                "SlurmctldTimeout=120",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
                f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    # ---- life cycle ------------------------------------------------------------------------------------------
    def start(self) -> LocalSlurm:
        ok, reason = is_available()
        if not ok:
            raise SlurmError(f"SLURM cannot run here: {reason}")
        began = time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "state").mkdir(exist_ok=True)
        self.runtime = Path(tempfile.mkdtemp(prefix="em-slurm-"))
        self.runtime.chmod(0o755)  # munged: every folder above its socket must be searchable by all
        (self.runtime / "spool").mkdir()
        self.ctld_port, self.slurmd_port = free_ports(2)
        self.conf.write_text(self.slurm_conf())
        try:
            self._start_munged()
            self._start_daemon("slurmctld")
            self._wait_controller()
            self._start_daemon("slurmd")
            self._wait_node_ready("the node to be idle", states=("idle",))
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _start_munged(self) -> None:
        key = self.folder / "munge.key"
        if not key.exists():  # munged: owned by its user (root), readable by no one else
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as out:
                out.write(os.urandom(1024))
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.folder / 'munged.pid'}",
                f"--seed-file={self.folder / 'munged.seed'}",
                f"--log-file={self.log('munged')}",
                "--num-threads=4",
            ],
        )

        def answers() -> bool:
            self._check_alive("munged")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.munge_socket))
                except OSError:
                    return False
            return True

        self._wait(answers, "munged to answer on its socket", ("munged",))

    def _start_daemon(self, name: str) -> None:
        # -D: stays the child of this process (its exact PID to stop; an early death is seen at once)
        self._spawn(name, [_which(name), "-D", "-f", str(self.conf)])

    def _spawn(self, name: str, argv: list[str | None]) -> None:
        assert name not in self._procs or self._procs[name].poll() is not None, f"{name} already runs"
        console = open(self.folder / f"{name}.console.log", "ab")
        try:
            self._procs[name] = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=self.client_environ(),
                cwd=self.folder,
                start_new_session=True,  # Ctrl-C in the terminal reaches the tests, which stop it in order
            )
        finally:
            console.close()

    def _failure(self, message: str, *daemons: str) -> SlurmError:
        tails = [f"{_tail(self.log(d))}\n{_tail(self.folder / f'{d}.console.log', 10)}" for d in daemons]
        return SlurmError("\n".join([message, *tails]))

    def _check_alive(self, daemon: str) -> None:
        proc = self._procs.get(daemon)
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise self._failure(f"{daemon} is not running (exit code {code})", daemon)

    def _wait(
        self, check: Callable[[], T], what: str, daemons: tuple[str, ...], timeout: float = START_TIMEOUT
    ) -> T:
        try:
            return wait_until(check, timeout, what)
        except TimeoutError as exc:
            raise self._failure(str(exc), *daemons) from None

    def _wait_controller(self) -> None:
        def answers() -> bool:
            self._check_alive("slurmctld")
            out = self.run("scontrol", "ping", check=False, timeout=10).stdout
            return "is UP" in out

        self._wait(answers, "slurmctld to answer `scontrol ping`", ("slurmctld",))

    def node_state(self) -> str:
        """The node's state as sinfo prints it (idle, mix, alloc, comp, down*, ...; '*' means not responding).

        All nodes are asked for, not ``-n NODE``: slurmctld 22.05 answers a one-node query from allocation
        counts it refreshes only on a query of all nodes, so after a job ends ``sinfo -n`` can say "mix" for
        as long as nothing else asks."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout
        states = dict(line.split(None, 1) for line in out.splitlines() if " " in line.strip())
        return states.get(self.node, "").strip()

    def _wait_node_ready(self, what: str, states: tuple[str, ...]) -> str:
        seen = []

        def ready() -> str | None:
            for daemon in ("slurmctld", "slurmd"):
                self._check_alive(daemon)
            seen.append(self.node_state())
            if seen[-1] == "inval":  # slurmd registered less than slurm.conf says: final, say it now
                raise TimeoutError(f"{what}: the node is invalid")
            return seen[-1] if seen[-1] in states else None

        try:
            return wait_until(ready, START_TIMEOUT, what)
        except TimeoutError as exc:
            # e.g. "drain" with the reason "Low RealMemory": slurmctld's verdict on what slurmd registered
            reason = self.run("sinfo", "-h", "-N", "-o", "%N %E", check=False, timeout=10).stdout.strip()
            message = f"{exc}: node state {seen[-1] if seen else None!r}, sinfo reason: {reason!r}"
            raise self._failure(message, "slurmctld", "slurmd") from None

    def restart_controller(self) -> float:
        """Stop slurmctld (SIGTERM: it saves its state) and start it again on the same state; returns once it
        answers and the node responds again (seconds taken)."""
        began = time.monotonic()
        self._terminate("slurmctld")
        self._start_daemon("slurmctld")
        self._wait_controller()
        self._wait_node_ready("the node to respond after the controller's restart", ("idle", "mix", "alloc"))
        return time.monotonic() - began

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons (SIGTERM, SIGKILL after a while) and every job process left."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                jobs = self.running_jobs()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                wait_until(lambda: not self.running_jobs(), 10, "jobs to end", interval=0.2)
            except (TimeoutError, subprocess.SubprocessError, OSError):
                pass  # swept below
        for name in ("slurmd", "slurmctld"):
            self._terminate(name)
        self._sweep_job_processes()
        self._terminate("munged")
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
            self.runtime = None

    def _terminate(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def job_processes(self, job_id: str | None = None) -> list:
        """This SLURM's slurmstepd processes and the processes of its jobs (psutil.Process, with ``info`` name
        and cmdline), of one job if given. A slurmstepd (its environment blanked by its process title) is ours
        when it holds our slurmd log open or listens in our spool, and names its step ("slurmstepd: [42.batch]");
        a job's process has the SLURM_CLUSTER_NAME and SLURM_JOB_ID slurmstepd gives it. A job is RUNNING in
        squeue before its slurmstepd exists: poll for them."""
        import psutil

        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        found = []
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            if proc.info["pid"] in mine:
                continue
            try:
                if proc.info["name"] == "slurmstepd":
                    step = " ".join(proc.info["cmdline"] or ())
                    if (job_id is None or f"[{job_id}." in step) and self._is_our_stepd(proc):
                        found.append(proc)
                    continue
                environ = proc.environ()
            except (psutil.Error, OSError):
                continue
            if environ.get("SLURM_CLUSTER_NAME") == self.cluster and "SLURM_JOB_ID" in environ:
                if job_id is None or environ["SLURM_JOB_ID"] == str(job_id):
                    found.append(proc)
        return found

    def _is_our_stepd(self, proc) -> bool:
        log = str(self.log("slurmd"))
        if any(f.path == log for f in proc.open_files()):
            return True
        spool = str(self.runtime / "spool") if self.runtime is not None else None
        return spool is not None and any(
            isinstance(c.laddr, str) and c.laddr.startswith(spool + os.sep)
            for c in proc.net_connections(kind="unix")
        )

    def _sweep_job_processes(self) -> None:
        import psutil

        procs = self.job_processes()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)

    def daemon_pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- client side -----------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, squeue, scancel, scontrol, sinfo) against this SLURM; text output."""
        result = subprocess.run(
            list(cmd), env=self.client_environ(), capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} exited with {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (sbatch arguments); returns its job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job_id: str) -> tuple[str, str] | None:
        """(state, reason) of a job squeue still knows (PENDING/RUNNING/COMPLETING..., e.g. PartitionDown)."""
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False).stdout.strip()
        if not out or "|" not in out:
            return None
        state, reason = out.splitlines()[0].split("|", 1)
        return state, reason

    def running_jobs(self) -> list[str]:
        """Ids of the jobs squeue lists as not finished."""
        out = self.run("squeue", "-h", "-o", "%i", "-t", "PD,R,CG,CF,S,RS,RH,RQ", check=False).stdout
        return out.split()

    def job_records(self) -> list[dict[str, str]]:
        """Every line of the jobcomp/filetxt file (one a finished job, in order) as a dict: JobId, Name,
        JobState (COMPLETED, CANCELLED, FAILED, TIMEOUT...), ExitCode, StartTime, EndTime, NodeList..."""
        try:
            text = self.jobcomp.read_text()
        except FileNotFoundError:
            return []
        return [_parse_record(line) for line in text.splitlines() if line.strip()]

    def job_record(self, job_id: str) -> dict[str, str] | None:
        """The completion record of a job, None while it has none."""
        found = [r for r in self.job_records() if r.get("JobId") == str(job_id)]
        return found[-1] if found else None

    def wait_for_record(self, job_id: str, timeout: float = 30) -> dict[str, str]:
        """The completion record of a job, once SLURM has written it."""
        return wait_until(lambda: self.job_record(job_id), timeout, f"job {job_id}'s completion record")

    def describe(self) -> str:
        """squeue (every state), sinfo and the node as scontrol shows them: for an assertion's message."""
        parts = [
            self.run("squeue", "-t", "all", "-o", "%i %j %T %r %M %l", check=False).stdout,
            self.run("sinfo", "-N", "-o", "%N %P %t %C %e %E", check=False).stdout,
            self.run("scontrol", "show", "node", self.node, check=False).stdout,
        ]
        return "\n".join(p.strip() for p in parts)

    def end_walltime_now(self, job_id: str) -> None:
        """Move a running job's end to now: slurmctld's next time-limit check (every 30 s) ends it as TIMEOUT,
        exactly as a job reaching its ``--time`` (whose granularity is a minute)."""
        self.run("scontrol", "update", f"JobId={job_id}", "EndTime=now")

    def set_partition_state(self, partition: str, state: str) -> None:
        """UP, DOWN (jobs queue but do not start), DRAIN or INACTIVE."""
        self.run("scontrol", "update", f"PartitionName={partition}", f"State={state}")


_FIELD = re.compile(r"(\w+)=(.*?)(?= \w+=|$)")


def _parse_record(line: str) -> dict[str, str]:
    return {key: value for key, value in _FIELD.findall(line.strip())}
