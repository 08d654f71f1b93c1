"""Every shell command block the README and the documentation (docs/*.md) show, each pasted alone into a
fresh terminal in a fresh checkout.

The fenced ``sh``/``bash``/``shell``/``console`` blocks of README.md and then of docs/ (in the site's order) are
read as written (new pages' blocks are picked up by themselves); each block is one test, run by bash in the
checkout of ``tests/support/demo_state.py`` (the same fresh checkout `make demo` ran in). Every block starts
from a new user's environment in the checkout's folder, as a new terminal would; inside a block the
environment and working folder one command leaves carry over to the next (``export``, ``eval``, ``cd``), as
pasting the block does. A command that is not run is skipped with its reason (``pytest -rs`` lists them).
``make dev`` and ``make deploy-local`` run until they are up, then get SIGTERM as `kill %1` sends it and must stop
cleanly.

The public-dataset commands (``dagster asset materialize ... --select ingest/empiar``, the FlyEM and IDR backfills)
also run exactly as the README prints them, against loopback servers that speak each source's protocol
(:class:`tests.support.public_mirror.PublicMirror`: the EMPIAR REST API with its FTP archive and HTTPS mirror, IDR's
JSON API and archive, EPFL's HTTP file with Range, a DVID for FlyEM) instead of the internet, which tests cannot
reach. That is the one difference from a user's terminal: before the first such command the test exports the
mirror's ``EM_<SOURCE>_<FIELD>`` settings into the terminal, as a user pointing the platform at a local mirror
would (README, "Mirrors"); the commands themselves are not changed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support.browser import REPO, stop_process
from tests.support.demo_state import demo_state
from tests.support.public_mirror import PublicMirror

pytestmark = pytest.mark.slow
SHELL_FENCES = {"sh", "bash", "shell", "console"}
COMMAND_TIMEOUT = 600  # seconds for one command on a busy machine

# Commands not executed, and why (each is reported as a skip with this reason).
NOT_RUN = [
    (r"^make test-fast\b", "most of make test's suite, which CI runs before this one (make test-e2e)"),
    (r"^make test(?=\s|$)", "the test suite, which CI runs before this one (make test-e2e)"),
    (r"^make test-e2e\b", "the end-to-end suite: this test runs inside it"),
    (r"^make bench\b", "benchmarks run for minutes; the lead runs them (bench/results/*.json)"),
    (
        r"^make (images|compose-up|compose-status|compose-down|test-compose|container-engine)\b",
        "the container deployment: make test-compose runs these commands as the deployment page shows them "
        "(tests/compose/), against a stack of its own (COMPOSE_ENV)",
    ),
    (
        r"^make (test-slurm|slurm-engine|test-faults|test-ops|ops-engine)\b",
        "a fault suite or a real SLURM's daemons for minutes: its own target, which CI runs after make test",
    ),
    (
        r"^make demo\b",
        "ran (twice) in this same fresh checkout by tests/support/demo_state.py; tests/test_demo.py checks "
        "what it printed, and the commands after it here see its state",
    ),
    (
        r"^(\.venv/bin/)?em-platform stitch tiles/ ",
        "a template with placeholder arguments (tiles/, layout.csv, [options]); the stitch CLI itself is "
        "tested by tests/test_stitch_cli.py (issue 14 owns this example)",
    ),
]


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(section heading, command) for every command line in a page's shell blocks, in order.

    Lines ending in a backslash continue; blank lines and lines that are only a comment are not commands;
    a leading ``$ `` prompt (console blocks) is dropped.
    """
    commands: list[tuple[str, str]] = []
    section, fence, pending = "(top)", None, ""
    for line in text.splitlines():
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            m = re.match(r"^```(\w*)\s*$", line)
            if m:
                fence = m.group(1).lower()
            continue
        if line.startswith("```"):
            fence = None
            continue
        if fence not in SHELL_FENCES:
            continue
        stripped = line.strip().removeprefix("$ ")
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        commands.append((section, pending + stripped))
        pending = ""
    return commands


def command_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(section heading, its commands) for every shell block of a page, in order."""
    blocks: list[tuple[str, list[str]]] = []
    section, lines, inside = "(top)", [], False
    for line in text.splitlines():
        if not inside:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            m = re.match(r"^```(\w*)\s*$", line)
            if m and m.group(1).lower() in SHELL_FENCES:
                inside, lines = True, [line]
            continue
        lines.append(line)
        if line.startswith("```"):
            inside = False
            commands = [c for _, c in readme_commands("\n".join(lines))]
            if commands:
                blocks.append((section, commands))
    return blocks


def doc_pages() -> list[Path]:
    """README.md, then the documentation's pages in the order of the site's navigation (mkdocs.yml)."""
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = [next(iter(entry.values())) for entry in nav]
    return [REPO / "README.md", *(REPO / "docs" / page for page in pages)]


BLOCKS = [
    (page.relative_to(REPO).as_posix(), section, commands)
    for page in doc_pages()
    for section, commands in command_blocks(page.read_text())
]
COMMANDS = [(f"{page}: {section}", c) for page, section, commands in BLOCKS for c in commands]


# Commands that reach a public source: run against the loopback mirror (see the module docstring).
PUBLIC_SOURCE = re.compile(
    r"--select ingest/(empiar|epfl|flyem|idr|openorganelle)\b|-j ingest_(empiar|epfl|flyem|idr|openorganelle)_job\b"
)


def _reason_not_run(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


class Terminal:
    """One bash 'terminal': every command starts from the environment and folder the previous one left."""

    def __init__(self, checkout: Path, env: dict[str, str]):
        self.env = env
        self.state = checkout / ".readme-terminal.env"
        self.cwd = checkout / ".readme-terminal.cwd"
        self.cwd.write_text(str(checkout))
        subprocess.run(["bash", "-c", f"export -p > {self.state}"], env=env, check=True)

    def export(self, variables: dict[str, str]) -> None:
        """What a user types before the next command: ``export NAME=value`` for each variable."""
        with open(self.state, "a") as f:
            for name, value in variables.items():
                f.write(f"export {name}={shlex.quote(value)}\n")

    def script(self, command: str) -> str:
        return (
            f'source {self.state} >/dev/null 2>&1; cd "$(cat {self.cwd})"\n{command}\nrc=$?\n'
            f'export -p > {self.state}; pwd > {self.cwd}; exit "$rc"\n'
        )

    def run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", self.script(command)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def public_mirror(tmp_path_factory):
    """Loopback servers holding the README's public datasets in their real formats and protocols."""
    with PublicMirror(tmp_path_factory.mktemp("public-mirror")) as mirror:
        yield mirror


def test_the_docs_have_commands_and_every_one_is_run_or_skipped_with_a_reason():
    assert len(COMMANDS) >= 5
    for _, command in COMMANDS:
        assert not command.startswith("em-platform "), (
            f"README command {command!r}: em-platform is not on PATH in a fresh clone; write .venv/bin/em-platform"
        )


@pytest.mark.parametrize(
    "page,section,commands",
    BLOCKS,
    ids=[f"{i:02d}-{page.removeprefix('docs/')}-{c[0][:40]}" for i, (page, _, c) in enumerate(BLOCKS)],
)
def test_doc_command_block(request, page, section, commands):
    """One block, pasted alone into a new terminal: every command in it succeeds (or is skipped, saying why)."""
    state = demo_state()
    terminal = Terminal(state.checkout, dict(state.env))
    run = [c for c in commands if not _reason_not_run(c)]
    if not run:
        pytest.skip(
            f"{page} ({section}): " + "; ".join(f"`{c}` not run: {_reason_not_run(c)}" for c in commands)
        )
    if any(PUBLIC_SOURCE.search(c) for c in run):
        terminal.export(request.getfixturevalue("public_mirror").env)  # a user pointing at a local mirror
    for command in commands:
        reason = _reason_not_run(command)
        if reason:
            print(f"{page} ({section}) `{command}` not run: {reason}")
            continue
        if re.match(r"^make (dev|deploy-local)\b", command):
            _run_until_sigterm(terminal, command)
            continue
        done = terminal.run(command)
        assert done.returncode == 0, (
            f"{page} ({section}) `{command}` exited {done.returncode} (the block pasted alone into a new "
            f"terminal):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        assert "Traceback (most recent call last)" not in done.stdout + done.stderr, done.stdout + done.stderr


def _run_until_sigterm(terminal: Terminal, command: str) -> None:
    """A command that serves until stopped (`make dev`, `make deploy-local`), as `cmd &` starts it (SIGINT
    ignored): until it is up, then SIGTERM to its job as `kill %1` sends it; it must stop cleanly and soon."""
    log = Path(terminal.state).with_suffix(".serve.log")
    if re.match(r"^make dev\b", command):
        port = terminal.env["DEV_PORT"]
        viewer = str(urllib.parse.urlsplit(terminal.env["EM_VIEWER_URL"]).port)  # the image viewer beside it
        up = lambda: _answers(port) and _answers(viewer, "/v/em/")  # noqa: E731
        down = lambda text: (  # noqa: E731
            not _answers(port)
            and not _answers(viewer, "/v/em/")
            and re.search(r"Dagster services (shut down|killed)", text)
        )
        quiet = "Checking for new runs for sensor"  # quiet sensors: nothing changed
        # measured: down ~2 s after SIGTERM on a quiet machine, 19 s+ on a loaded one (a daemon mid-launch);
        # em_platform.dev kills what is still up 12 s after its SIGINT
        bound = 30
    else:  # make deploy-local: it says when every service answers, and "stopped" once all are gone
        up = lambda: "Ctrl-C stops every service." in log.read_text()  # noqa: E731
        down = lambda text: re.search(r"^stopped$", text, re.M)  # noqa: E731  (make[1]: lines may follow)
        quiet = "Traceback (most recent call last)"
        # measured: 2.4 s on a quiet machine; under the 20 s grace after which the runner SIGKILLs (a code
        # server that ignored SIGTERM, as it did when started from a background job, took exactly that)
        bound = 15
        web = terminal.env.get("EM_WEB_PORT", "3000")

    def ignore_sigint() -> None:  # what a non-interactive shell does to a background job
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", terminal.script(command)],
            env=terminal.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=ignore_sigint,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not up():
            assert proc.poll() is None, f"`{command}` exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"`{command}` not up after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)  # poll interval while it starts
        started = time.monotonic()
        if "deploy-local" in command:  # as the docs say: `make deploy-down` from another shell
            stopped = subprocess.run(  # a new shell in the same folder, the user's environment
                ["bash", "-c", "make deploy-down"],
                cwd=terminal.cwd.read_text().strip(),
                env=terminal.env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            proc.wait(timeout=bound)  # the runner itself is gone: nothing is left to restart a service
            assert not _answers(web), "the UI still answers after make deploy-down"
        else:
            os.killpg(proc.pid, signal.SIGTERM)  # `kill %1`: the job's process group
        while not down(log.read_text()):
            assert time.monotonic() - started < bound, (
                f"`{command}` still up {bound} s after SIGTERM:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)  # poll interval while it shuts down
        seconds = time.monotonic() - started
    finally:
        stop_process(proc)
        if (
            "deploy-local" in command
        ):  # whatever it left running, by the PIDs it recorded (`make deploy-down`)
            from em_platform.deploy.processes import stop_from_pid_file

            stop_from_pid_file(Path(terminal.cwd.read_text().strip()) / "var" / "deploy")
    assert quiet not in log.read_text(), log.read_text()[-3000:]
    print(f"`{command}`: up, stopped {seconds:.1f} s after SIGTERM")


def test_command_extraction_follows_what_a_terminal_gets():
    text = (
        "# A\n```sh\nmake demo   # comment\n# only a comment\n\nfoo --a \\\n  --b\n```\n"
        "```\nnot a command\n```\n## B\n```console\n$ bar\n```\n"
    )
    assert readme_commands(text) == [("A", "make demo   # comment"), ("A", "foo --a --b"), ("B", "bar")]


def _answers(port: str, path: str = "/server_info") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5):
            return True
    except OSError:
        return False
