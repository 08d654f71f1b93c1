"""A fresh checkout with `make demo` run in it, once per test session: shared by the demo's tests, the browser
tests of the UI and the README-commands test.

The checkout is a copy of this one's files (what a clone holds: tracked and not-ignored files) whose `.venv`
links to this venv's interpreter and packages, with `PYTHONPATH` pointing at the copy so its own code runs and
its defaults (data root, Dagster home: the copy's `var/`) apply. Before the demo a corrupt TIFF is dropped into
the inbox, so the state holds good and failed partitions, passed and failed checks, and a processed montage.
`make demo` then runs a second time (it must change nothing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.browser import REPO
from tests.support.environment import clean_env
from tests.support.ports import free_port

BROKEN = "broken_scan.tif"  # not a TIFF: the demo's one failed entry
_STATE: DemoState | None = None


@dataclass
class DemoState:
    checkout: Path
    env: dict[str, str]
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    tree_after_first: dict[str, int]
    tree_after_second: dict[str, int]
    runs: list = field(default_factory=list)  # the instance's runs right after the demos

    @property
    def dagster_home(self) -> Path:
        return self.checkout / "var" / "dagster_home"

    @property
    def data_root(self) -> Path:
        return self.checkout / "var" / "data"


def fresh_checkout(root: Path) -> Path:
    """Copy what a clone of this repository holds; its `.venv` links to this one's (no install needed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    checkout = root / "checkout"
    for rel in filter(None, (p.decode() for p in listed)):
        src = REPO / rel
        if src.is_file():
            dst = checkout / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    venv = checkout / ".venv"
    venv.mkdir()
    real = Path(sys.prefix)
    for entry in real.iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()  # newer than every copied file: make sees the set-up done
    return checkout


def checkout_env(checkout: Path) -> dict[str, str]:
    """A new user's environment in the checkout: none of our EM_* or Dagster settings, the copy's code first."""
    env = clean_env("EM_", "DAGSTER_")
    env["PYTHONPATH"] = str(checkout)
    env["DEV_PORT"] = str(free_port())  # `make dev` on a free port (tests never take a fixed one)
    env["EM_VIEWER_URL"] = f"http://127.0.0.1:{free_port()}"  # the image viewer's, likewise
    return env


def data_tree(root: Path) -> dict[str, int]:
    """Every file under the data root with its modification time (the catalog DB aside)."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and "catalog.sqlite" not in p.name
    }


def demo_state() -> DemoState:
    """`make demo` twice in a fresh checkout (once per test session); what it printed and left behind."""
    global _STATE
    if _STATE is None:
        checkout = fresh_checkout(Path(tempfile.mkdtemp(prefix="em-demo-")))
        env = checkout_env(checkout)
        inbox = checkout / "var" / "data" / "inbox"
        inbox.mkdir(parents=True)
        (inbox / BROKEN).write_bytes(b"this is not a TIFF file" * 200)
        settled = time.time() - 3600  # arrived long ago: the inbox sensor takes it at once
        os.utime(inbox / BROKEN, (settled, settled))
        cmd = ["make", "--no-print-directory", "demo"]
        first = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
        after_first = data_tree(checkout / "var" / "data")
        second = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
        state = DemoState(checkout, env, first, second, after_first, data_tree(checkout / "var" / "data"))
        state.runs = _runs(state.dagster_home)
        _STATE = state
    return _STATE


def remove_demo_state() -> None:
    """The checkout gone at the session's end (250 MB in the temporary folder, left by every run before)."""
    global _STATE
    if _STATE is not None:
        shutil.rmtree(_STATE.checkout.parent, ignore_errors=True)
        _STATE = None


def _runs(dagster_home: Path) -> list:
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(dagster_home)  # dagster.yaml's storage reads it
    try:
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
        try:
            return list(instance.get_runs())
        finally:
            instance.dispose()
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous
