"""Dask workers as a facility's SLURM jobs, through dask-jobqueue's ``SLURMCluster`` (no sbatch scripts of ours).

The run's process holds the Dask scheduler; each worker is one batch job that connects back to it, so the
compute nodes must reach this host's cluster address (:func:`scheduler_hosts`) and see the data root (a shared
filesystem or S3). The scheduler runs whatever a connected client sends it, in the run's process with the run's
secrets, and listens where others reach it: it speaks only TLS, with a CA and certificates made for the run
(:mod:`em_platform.cluster.run_certificates`), unless ``EM_SLURM_TLS`` turns that off, which the run is told of
with what it exposes. Three things a plain ``SLURMCluster`` leaves to its user are done here too:

* a queue that starts nothing fails the run after ``start_timeout`` seconds naming the partition and SLURM's
  own reason (``squeue``'s ``%r``: ``PartitionDown``, ``Resources``, ``QOSMaxJobsPerUserLimit`` ...), never hangs:
  before the first worker joins (:func:`wait_for_first_worker`) and mid-run, when every worker is gone and no
  new job starts (Dask's ``no-workers-timeout`` fails the waiting tasks, :mod:`em_platform.cluster.stall`,
  and SLURM's reason is kept in :attr:`JobLog.stalled`);
* workers retire before their walltime (Dask's ``--lifetime``), so their tasks move to a new job rather than
  dying with a ``TIMEOUT``; a job that is killed anyway (``scancel``, a node lost) has its tasks recomputed
  on the jobs adaptive scaling starts in its place;
* each worker job's id, its time in the queue and its time computing are recorded (:class:`JobLog`), for the
  run's logs and tags.

Dagster-free; the Dask resource (:mod:`em_platform.resources.dask`) starts it when ``EM_COMPUTE=slurm``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from em_platform.switch import parse_switch

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)
_QUEUE = re.compile(r"^[A-Za-z0-9_.-]+$")
CLOSE_GRACE = 15.0  # seconds a retired worker's job has to exit by itself before it is cancelled
LOOPBACK = "127.0.0.1"
DEFAULT_ROUTE_PEER = "8.8.8.8"  # an address off every cluster network: the route to it is the default route
SLURMCTLD_PORT = 6817  # SLURM's default; only the route to it matters (nothing is sent)
_CONTROLLER = re.compile(r"^SlurmctldHost\[0\]\s*=\s*([^\s(]+)(?:\(([^)]+)\))?", re.MULTILINE)
_log = logging.getLogger(__name__)


class SlurmSettingError(ValueError):
    """An EM_SLURM_* setting that cannot be used (the message names it); load_settings makes it a ConfigError."""


class SlurmQueueStalled(RuntimeError):
    """No worker job started within the wait: the partition is down, full, or the jobs are held."""


class SharedStorageMissing(RuntimeError):
    """A worker on a compute node cannot reach the data root."""


def walltime_seconds(walltime: str) -> int:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in seconds."""
    m = _WALLTIME.match(walltime.strip())
    if not m:
        raise ValueError(walltime)
    days, a, b, c = (int(g) if g else None for g in m.groups())
    assert a is not None  # the pattern's one required group
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        assert b is not None  # the optional groups fill in order: c only after b
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # MM


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how the worker jobs run (``EM_SLURM_*``; :meth:`from_env`)."""

    queue: str = "debug"  # the partition (sbatch -p)
    account: str | None = None  # sbatch -A
    cores: int = 1  # threads per worker job
    memory: str = "4GB"  # per worker job; Dask's limit too
    walltime: str = "01:00:00"
    directives: tuple[str, ...] = ()  # further #SBATCH options, e.g. "--qos=normal", "--constraint=avx2"
    prologue: tuple[str, ...] = ()  # shell lines before the worker starts, e.g. "module load python"
    python: str = field(default_factory=lambda: sys.executable)  # the workers' interpreter, with em_platform
    min_jobs: int = 1
    max_jobs: int = 4
    # this host's address the compute nodes reach; None: scheduler_hosts finds it
    scheduler_host: str | None = None
    start_timeout: float = 600.0  # seconds a run waits for a worker job to start (first, or mid-run)
    log_directory: str | None = None  # the jobs' stdout/stderr (a shared folder); see job_log_directory
    # the scheduler, the run's client and the workers speak TLS with certificates made for the run
    tls: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmSettings:
        env = os.environ if env is None else env
        d = cls()

        def get(name: str) -> str:
            return env.get(name, "").strip()

        def integer(name: str, default: int, low: int) -> int:
            value = get(name) or str(default)
            if not value.isdigit() or int(value) < low:
                raise SlurmSettingError(f"{name}={value!r} must be a whole number ≥ {low}")
            return int(value)

        queue = get("EM_SLURM_QUEUE") or d.queue
        if not _QUEUE.match(queue):
            raise SlurmSettingError(
                f"EM_SLURM_QUEUE={queue!r} is not a partition name (letters, digits, _ . -)"
            )
        memory = get("EM_SLURM_MEMORY") or d.memory
        if not _MEMORY.match(memory):
            raise SlurmSettingError(f"EM_SLURM_MEMORY={memory!r} must be an amount such as 4GB or 512MiB")
        walltime = get("EM_SLURM_WALLTIME") or d.walltime
        try:
            if walltime_seconds(walltime) < 60:
                raise ValueError
        except ValueError:
            raise SlurmSettingError(
                f"EM_SLURM_WALLTIME={walltime!r} must be SLURM's time of at least a minute (MM, HH:MM:SS or D-HH:MM)"
            ) from None
        min_jobs = integer("EM_SLURM_MIN_JOBS", d.min_jobs, 1)
        max_jobs = integer("EM_SLURM_MAX_JOBS", d.max_jobs, 1)
        if max_jobs < min_jobs:
            raise SlurmSettingError(f"EM_SLURM_MAX_JOBS={max_jobs} is below EM_SLURM_MIN_JOBS={min_jobs}")
        timeout = get("EM_SLURM_START_TIMEOUT") or str(d.start_timeout)
        try:
            start_timeout = float(timeout)
            if start_timeout <= 0:
                raise ValueError
        except ValueError:
            raise SlurmSettingError(
                f"EM_SLURM_START_TIMEOUT={timeout!r} must be a number of seconds > 0"
            ) from None
        python = get("EM_SLURM_PYTHON") or d.python
        if not os.path.isabs(python):
            raise SlurmSettingError(
                f"EM_SLURM_PYTHON={python!r} must be the absolute path of the workers' interpreter (with em_platform)"
            )
        return cls(
            queue=queue,
            account=get("EM_SLURM_ACCOUNT") or None,
            cores=integer("EM_SLURM_CORES", d.cores, 1),
            memory=memory,
            walltime=walltime,
            directives=tuple(_lines(get("EM_SLURM_DIRECTIVES"))),
            prologue=tuple(_lines(get("EM_SLURM_PROLOGUE"))),
            python=python,
            min_jobs=min_jobs,
            max_jobs=max_jobs,
            scheduler_host=get("EM_SLURM_SCHEDULER_HOST") or d.scheduler_host,
            start_timeout=start_timeout,
            log_directory=get("EM_SLURM_LOG_DIRECTORY") or None,
            tls=_flag("EM_SLURM_TLS", get("EM_SLURM_TLS"), default=d.tls),
        )

    @property
    def lifetime_seconds(self) -> int:
        """How long a worker works before it retires: the walltime less a margin to hand its data on."""
        wall = walltime_seconds(self.walltime)
        return max(30, wall - max(30, min(300, wall // 10)))


def _flag(name: str, value: str, default: bool = False) -> bool:
    """An on/off setting; ``default`` when unset, so that only an explicit word turns a safe default off."""
    if not value.strip():
        return default
    try:
        return parse_switch(value)
    except ValueError:
        raise SlurmSettingError(f"{name}={value!r} must be 1 (on) or 0 (off)") from None


def job_log_directory(settings: SlurmSettings, data_root: str | None) -> str:
    """Where the jobs write their stdout and stderr (and, with TLS, their certificates): EM_SLURM_LOG_DIRECTORY,
    else ``slurm-jobs`` in a local data root (shared with the nodes already), else ``~/.em_platform/slurm-jobs``.
    Never SLURM's default, the folder the run was started in."""
    if settings.log_directory:
        folder = settings.log_directory
    elif data_root and "://" not in data_root:
        folder = os.path.join(data_root, "slurm-jobs")
    else:
        folder = os.path.join(os.path.expanduser("~"), ".em_platform", "slurm-jobs")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def scheduler_hosts(settings: SlurmSettings, controller: Callable[[], str | None] | None = None) -> list[str]:
    """Where the run's scheduler listens: first this host's cluster address, which the worker jobs are given,
    then loopback, for clients on this host. The cluster address is ``EM_SLURM_SCHEDULER_HOST``, else the one
    this host reaches slurmctld from (the compute nodes' network), else the one of its default route; loopback
    alone when that is loopback too (a single-node cluster, or a host with no network)."""
    host = settings.scheduler_host
    if not host:
        peers = [(controller or slurmctld_address)(), DEFAULT_ROUTE_PEER]
        found = (_source_address(p) for p in peers if p and not _is_loopback(p))
        host = next((a for a in found if a and not _is_loopback(a)), LOOPBACK)
    return [host] if _is_loopback(host) else [host, LOOPBACK]


def slurmctld_address(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str | None:
    """The address of SLURM's controller (``SlurmctldHost`` in ``scontrol show config``); None if unknown."""
    try:
        done = run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = _CONTROLLER.search(done.stdout or "")
    if not m:
        return None
    if m.group(2):
        return m.group(2)
    try:
        address = socket.getaddrinfo(m.group(1), SLURMCTLD_PORT, type=socket.SOCK_DGRAM)[0][4][0]
    except OSError:
        return None
    # an AF_INET/AF_INET6 sockaddr starts with the host; typeshed also allows (int, bytes), which is no address
    return address if isinstance(address, str) else None


def _source_address(peer: str) -> str | None:
    """The address of this host that packets to ``peer`` leave from: a UDP socket's connect picks the route and
    sends nothing."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in peer else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, SLURMCTLD_PORT))
            return s.getsockname()[0]
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            )
        except OSError:
            return False


def _lines(value: str) -> list[str]:
    """A setting of several entries: separated by ``;`` or new lines."""
    return [part.strip() for part in re.split(r"[;\n]", value) if part.strip()]


@dataclass
class WorkerJob:
    """One worker job as the run saw it (monotonic seconds)."""

    job_id: str
    submitted: float
    joined: float | None = None
    left: float | None = None

    def queue_wait(self, now: float) -> float:
        return (self.joined if self.joined is not None else now) - self.submitted

    def computing(self, now: float) -> float:
        if self.joined is None:
            return 0.0
        return (self.left if self.left is not None else now) - self.joined


class JobLog:
    """Every worker job of a cluster: submitted (sbatch returned), joined and left the scheduler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs: list[WorkerJob] = []
        self._current: dict[str, WorkerJob] = {}  # by Dask worker name, which a replacement job takes over
        # SLURM's word when the run's tasks waited out the wait with no worker
        self.stalled: str | None = None
        self.releasing = False  # the run's work is done: workers leaving are not replaced

    def submitted(self, name: str, job_id: str) -> None:
        with self._lock:
            job = WorkerJob(job_id, time.monotonic())
            self.jobs.append(job)
            self._current[name] = job

    def joined(self, name: str) -> None:
        with self._lock:
            if (job := self._current.get(name)) is not None and job.joined is None:
                job.joined = time.monotonic()

    def left(self, name: str) -> None:
        with self._lock:
            if (job := self._current.get(name)) is not None and job.joined is not None and job.left is None:
                job.left = time.monotonic()

    def ran(self, job_id: str) -> bool:
        """Whether the job's worker joined the scheduler (it did work, so it ends as finished work)."""
        with self._lock:
            return any(job.job_id == job_id and job.joined is not None for job in self.jobs)

    def waiting(self) -> list[str]:
        """The jobs submitted whose worker has not joined (pending, or started and not yet connected)."""
        with self._lock:
            return [job.job_id for job in self.jobs if job.joined is None]

    def stall(self, reason: str) -> None:
        with self._lock:
            self.stalled = self.stalled or reason

    def summary(self) -> dict[str, str]:
        """For the run's tags and log: the job ids, and the seconds spent queued and computing."""
        now = time.monotonic()
        with self._lock:
            jobs = list(self.jobs)
        return {
            "slurm_jobs": ",".join(j.job_id for j in jobs),
            "slurm_queue_wait_s": f"{sum(j.queue_wait(now) for j in jobs):.1f}",
            "slurm_max_queue_wait_s": f"{max((j.queue_wait(now) for j in jobs), default=0.0):.1f}",
            "slurm_compute_s": f"{sum(j.computing(now) for j in jobs):.1f}",
            **({"slurm_stalled": self.stalled} if self.stalled else {}),
        }


def start_cluster(
    settings: SlurmSettings,
    log: JobLog,
    log_directory: str,
    *,
    name: str = "em-platform",
    warn: Callable[[str], None] | None = None,
):
    """A ``SLURMCluster`` scaling between ``min_jobs`` and ``max_jobs`` worker jobs, each recorded in ``log``;
    its tasks fail (:func:`is_stalled`) when no worker has run them for ``start_timeout`` seconds. Its scheduler
    listens on :func:`scheduler_hosts`, with TLS and the run's certificates unless ``settings.tls`` is off;
    ``warn`` (the run's log; this module's logger by default) is told what is exposed then."""
    if shutil.which("sbatch") is None:
        raise SlurmQueueStalled(
            "EM_COMPUTE=slurm but `sbatch` is not on PATH: run on a host of the SLURM cluster (a login or "
            "submit node) with SLURM's commands installed"
        )
    import dask
    from dask.utils import parse_timedelta
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status
    from distributed.diagnostics.plugin import SchedulerPlugin

    from em_platform.cluster.run_certificates import RunCertificates

    class RecordedJob(SLURMJob):
        async def start(self) -> None:
            await super().start()
            log.submitted(self.name, str(self.job_id))

        async def close(self) -> None:
            """Adaptive scaling retires a worker it lets go (``close_workers``) and then closes its job with
            ``scancel`` at once, which lands before the job script has exited: SLURM recorded ``CANCELLED`` a
            job that did its work. A job whose worker joined is given :data:`CLOSE_GRACE` seconds to end by
            itself (``COMPLETED``); one still queued or starting is cancelled now (it did nothing)."""
            if self.job_id and log.ran(str(self.job_id)):
                deadline = time.monotonic() + CLOSE_GRACE
                while await _job_alive(str(self.job_id)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
            await super().close()

    class Membership(SchedulerPlugin):
        def add_worker(self, scheduler, worker: str) -> None:
            log.joined(scheduler.workers[worker].name)

        def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
            ws = scheduler.workers.get(worker)
            if ws is not None:
                log.left(ws.name)
            if not log.releasing:  # a job lost (scancel, a node) or retired at its lifetime: start another
                forgotten = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
                asyncio.get_running_loop().call_later(forgotten + 1.0, replace_lost_jobs)

        def log_event(self, topic, msg) -> None:
            if isinstance(msg, dict) and msg.get("action") == "no-workers-timeout-exceeded":
                ids = log.waiting()
                log.stall(
                    f"no worker job ran on SLURM partition {settings.queue!r} for {settings.start_timeout:g} s: "
                    f"{queue_reasons(ids) or 'no job was pending'}"
                )

    lifetime = settings.lifetime_seconds
    hosts = scheduler_hosts(settings)
    os.makedirs(log_directory, mode=0o700, exist_ok=True)
    # the workers' copies in the (shared) log folder, removed when the cluster closes, however it closes
    certificates = RunCertificates(log_directory) if settings.tls else None

    class RunCluster(SLURMCluster):
        async def _close(self) -> None:
            try:
                await super()._close()
            finally:
                if certificates is not None:
                    certificates.remove()

    try:
        with dask.config.set({"distributed.scheduler.no-workers-timeout": f"{settings.start_timeout}s"}):
            cluster = RunCluster(
                # dask_jobqueue annotates job_cls as a Job instance (`job_cls: Job = None`); it takes the class
                job_cls=RecordedJob,  # type: ignore[arg-type]
                queue=settings.queue,
                account=settings.account,
                cores=settings.cores,
                processes=1,
                memory=settings.memory,
                walltime=settings.walltime,
                job_extra_directives=list(settings.directives),
                job_script_prologue=list(settings.prologue),
                python=settings.python,
                job_name=name,
                log_directory=log_directory,
                security=certificates.security if certificates is not None else None,
                shared_temp_directory=log_directory,
                # the dashboard on loopback only (None still serves its routes on every interface): ssh -L to see it
                scheduler_options={"host": hosts, "dashboard_address": f"{LOOPBACK}:0"},
                worker_extra_args=[
                    "--lifetime",
                    f"{lifetime}s",
                    "--lifetime-stagger",
                    f"{min(60, lifetime // 10)}s",
                ],
                death_timeout=120,
            )
    except BaseException:
        if certificates is not None:
            certificates.remove()
        raise
    if certificates is None:
        (warn or _log.warning)(plain_tcp_warning(cluster.scheduler))

    def replace_lost_jobs() -> None:
        """SpecCluster forgets a lost job after Dask's lost-worker-timeout but opens a job in its place only
        when scaled: adaptive scaling does not when its target is unchanged (the only worker lost). So scale
        to the jobs planned, which submits one for each forgotten."""
        if not log.releasing and cluster.status == Status.running:
            cluster.scale(len(cluster.worker_spec))

    assert cluster.scheduler is not None  # SpecCluster starts its scheduler in its constructor
    cluster.scheduler.add_plugin(Membership(), name="em-platform-slurm-jobs")
    cluster.adapt(minimum_jobs=settings.min_jobs, maximum_jobs=settings.max_jobs)
    return cluster


def plain_tcp_warning(scheduler) -> str:
    """What a run without TLS exposes, naming the setting that turned TLS off and the scheduler's addresses."""
    addresses = ", ".join(listener.contact_address for listener in scheduler.listeners)
    return (
        f"EM_SLURM_TLS is off: this run's Dask scheduler ({addresses}) and its SLURM worker jobs speak plain TCP "
        "with no certificate, so anyone who reaches those ports (any user of this host or of the cluster's nodes) "
        "can run code in this run's process, with its secrets (storage keys, database passwords) and its data, "
        "and read what the workers exchange. Unset EM_SLURM_TLS (TLS is the default) unless that network is yours "
        "alone"
    )


def _alive_query(job_ids: list[str]) -> list[str]:
    """``squeue`` listing those of the jobs configuring (starting), running or completing; an unknown job
    (long gone from squeue) lists nothing."""
    return ["squeue", "-h", "-o", "%i", "-t", "CF,R,CG", "-j", ",".join(job_ids)]


async def _job_alive(job_id: str) -> bool:
    """Whether SLURM still has the job starting, running or completing (not blocking the scheduler's loop)."""
    process = await asyncio.create_subprocess_exec(
        *_alive_query([job_id]), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    return bool(out.split())


def wait_for_first_worker(client, cluster, settings: SlurmSettings, log: JobLog) -> None:
    """Until one worker job has joined; SlurmQueueStalled naming the partition and SLURM's reason after
    ``start_timeout`` seconds (the jobs are cancelled with the cluster)."""
    try:
        client.wait_for_workers(1, timeout=settings.start_timeout)
    except TimeoutError:
        ids = [job.job_id for job in log.jobs]
        raise SlurmQueueStalled(
            f"no worker job started on SLURM partition {settings.queue!r} in {settings.start_timeout:g} s: "
            f"{queue_reasons(ids) or 'no job was submitted'}; check `sinfo -p {settings.queue}` and "
            "`squeue --me`, or raise EM_SLURM_START_TIMEOUT"
        ) from None


def queue_reasons(
    job_ids: list[str], run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> str:
    """SLURM's word on each job: ``job 12 PENDING (PartitionDown)``, from ``squeue``."""
    if not job_ids:
        return ""
    done = run(
        ["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 2]
    if not rows:
        return f"squeue knows none of jobs {', '.join(job_ids)} ({done.stderr.strip() or 'ended'})"
    return "; ".join(f"job {i} {state} ({reason})" for i, state, reason in rows)


@dataclass(frozen=True)
class QueueSummary:
    """This user's SLURM jobs (the platform's worker jobs) as an operator's dashboard counts them."""

    jobs: dict[str, int]  # squeue's state (PENDING, RUNNING, ...) -> jobs
    oldest_pending_s: float  # how long the longest-waiting pending job has waited; 0 when none waits


def queue_summary(
    now: float, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> QueueSummary:
    """``squeue --me``: the jobs by state and the oldest pending one's wait; RuntimeError with squeue's
    words when it cannot answer (slurmctld down)."""
    done = run(["squeue", "--me", "-h", "-o", "%T|%V"], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"squeue failed ({done.returncode}): {done.stderr.strip()[:300]}")
    jobs: dict[str, int] = {}
    oldest = 0.0
    for line in done.stdout.splitlines():
        state, _, submitted = line.partition("|")
        if not state:
            continue
        jobs[state] = jobs.get(state, 0) + 1
        if state == "PENDING":
            try:  # squeue prints the submit time in the host's local time
                oldest = max(oldest, now - datetime.fromisoformat(submitted).timestamp())
            except ValueError:
                continue
    return QueueSummary(jobs, oldest)


def check_data_root(client, data_root: str) -> None:
    """Every worker reads and lists the data root, or SharedStorageMissing naming the worker and the path."""

    def reach(root: str) -> str | None:
        import socket

        try:
            if "://" in root:
                import fsspec

                fs, path = fsspec.core.url_to_fs(root)
                fs.ls(path.split("/", 1)[0])  # the bucket: the root itself may not exist yet
            elif not os.path.isdir(root) or not os.access(root, os.R_OK | os.W_OK | os.X_OK):
                return f"{socket.gethostname()}: {root} is not a folder this worker can read and write"
        except Exception as exc:  # noqa: BLE001 - reported with the host's name
            return f"{socket.gethostname()}: {root}: {exc}"
        return None

    problems = [p for p in client.run(reach, data_root).values() if p]
    if problems:
        raise SharedStorageMissing(
            "the SLURM worker jobs cannot reach the data root (EM_DATA_ROOT): "
            + "; ".join(problems)
            + ". Mount the shared filesystem at the same path on the compute nodes, or use S3 (docs/slurm.md)"
        )


def release(client, cluster, log: JobLog, timeout: float = 60.0) -> None:
    """End the worker jobs as finished work: adaptive scaling stopped, jobs still queued cancelled (SLURM records
    them ``CANCELLED`` on no node: they never ran), each worker retired (its job script exits 0, so SLURM records
    the job ``COMPLETED``), workers that join meanwhile too, then the cluster closed, which cancels whatever is
    left after ``timeout`` seconds."""
    log.releasing = True
    adaptive = getattr(cluster, "_adaptive", None)
    if adaptive is not None:
        adaptive.stop()
    try:
        deadline = time.monotonic() + timeout
        while True:
            ids = [job.job_id for job in log.jobs]  # again each time: a submission in flight lands late
            # a queued job either is cancelled here or has started, and then its worker is retired once it joins
            # (a job starting while the cluster closed was cancelled mid-start: seen on loaded machines)
            _cancel_queued(ids)
            client.retire_workers(close_workers=True)
            if not ids or not _still_running(ids) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    except Exception:  # noqa: BLE001 - the jobs are cancelled below whatever went wrong
        pass
    finally:
        cluster.close()  # and with it the workers' copies of the run's certificates


def _cancel_queued(job_ids: list[str]) -> None:
    """Cancel those of the jobs still pending; slurmctld decides atomically, so a job that starts meanwhile runs."""
    if job_ids:
        subprocess.run(["scancel", "--state=PENDING", *job_ids], capture_output=True, text=True, timeout=30)


def _still_running(job_ids: list[str]) -> bool:
    """Whether any of the jobs is starting (its node configuring), running or completing."""
    done = subprocess.run(
        _alive_query(job_ids),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return bool(done.stdout.split())
