"""`em-platform dev` (what `make dev` runs): `dagster dev` that stops on SIGTERM and logs only what happened.

Two things plain `dagster dev` gets wrong for an operator here: started in the background from a script
(`make dev &`), it inherits an ignored SIGINT and then ignores SIGTERM too, hanging until killed; and the
daemon logs every sensor tick, so a 5-second montage sensor fills the log with "nothing new". This wrapper
starts `dagster dev` with SIGINT restored, turns its own SIGTERM/SIGINT into the SIGINT `dagster dev` shuts
down on (waiting SHUTDOWN_GRACE_SECONDS for it, then killing its process group: a daemon busy launching
a run or finishing a tick can take 20 s on a loaded machine, and a killed run is failed and retried by run
monitoring on the next start), and drops the daemon's lines for
sensor ticks that found nothing. Everything else `dagster dev` prints passes through.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable

# Daemon lines for sensor ticks that request nothing (dagster/_daemon/sensor.py).
QUIET_TICK = re.compile(
    r"Checking for new runs for sensor: |No run requests returned for \S+, skipping|Sensor \S+ skipped: "
)
SHUTDOWN_GRACE_SECONDS = 12.0


def quiet_lines(lines: Iterable[str]) -> Iterable[str]:
    """The lines worth showing: sensor ticks that found nothing are left out."""
    return (line for line in lines if not QUIET_TICK.search(line))


def _restore_sigint() -> None:  # runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_dev(workspace: str, host: str, port: int, out=sys.stdout) -> int:
    """Run `dagster dev` until it exits or this process gets SIGTERM/SIGINT; its exit status."""
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", workspace, "-h", host, "-p", str(port)]
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
    )
    stopping = threading.Event()

    def stop(signum, _frame) -> None:
        if not stopping.is_set():
            stopping.set()
            print(f"em-platform dev: {signal.Signals(signum).name}: stopping Dagster", file=out, flush=True)
            threading.Thread(target=_shut_down, args=(child, out), daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    live_qc = LiveQC(out)
    try:
        for line in quiet_lines(child.stdout):
            out.write(line)
            out.flush()
        status = child.wait()
        live_qc.stop()
        if status == -signal.SIGKILL:
            print("em-platform dev: Dagster services killed", file=out, flush=True)
        return status
    finally:
        live_qc.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LiveQC:
    """The warm live-QC service (`em-platform live-qc`) beside Dagster, restarted if it dies, stopped with
    SIGTERM when `make dev` stops (and by the kernel if this process is killed)."""

    RESTART_SECONDS = 2.0

    def __init__(self, out):
        self.out = out
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._supervise, name="live-qc", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        cmd = [sys.executable, "-m", "em_platform.tem.live_qc_cli"]
        while not self.stopping.is_set():
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                preexec_fn=_child_of_this_process,
            )
            for line in self.proc.stdout:
                self.out.write(line)
                self.out.flush()
            status = self.proc.wait()
            if self.stopping.wait(0):
                return
            print(
                f"em-platform dev: live-qc exited ({status}); restarting in {self.RESTART_SECONDS:g} s",
                file=self.out,
                flush=True,
            )
            self.stopping.wait(self.RESTART_SECONDS)

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SHUTDOWN_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(5)


def _child_of_this_process() -> None:  # runs in the child before exec
    import ctypes

    _restore_sigint()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: dies with dev


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
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the group this wrapper started, by its id
    except ProcessLookupError:
        pass
