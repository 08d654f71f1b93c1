"""The Dagster web UI in a real browser: a webserver on a free port and Playwright driving Debian's Chromium.

Playwright cannot download its own browser here, so it drives the system Chromium (``scripts/install_chromium.sh``
installs it; ``EM_CHROMIUM`` points elsewhere). Without Chromium or the ``playwright`` package the browser
tests skip with the reason. Screenshots go to ``test-artifacts/browser/`` (gitignored; ``EM_TEST_ARTIFACTS``
moves it) and their paths are printed, so a person can look at what the UI showed.

Use::

    with start_webserver(dagster_home, env=env) as web, open_browser() as browser:
        page = new_page(browser)
        page.goto(web.url + "/jobs")
        screenshot(page, "jobs")

Reused by every browser test (embedded default and the multi-process deployment topology): pass
``workspace=`` (a workspace.yaml, e.g. one with a ``grpc_server`` entry) or ``module=``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"

# Flags that work for Debian's Chromium here (headless, no sandbox as root, no network of its own). No GPU:
# WebGL 2 (Neuroglancer draws with it) on SwiftShader, Chromium's CPU renderer.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1600, "height": 1000}
# Neuroglancer's panels are drawn by SwiftShader on the CPU: a third of the pixels, a third of the drawing.
VIEWER_VIEWPORT = {"width": 960, "height": 600}


def chromium_path() -> str | None:
    """The Chromium the tests drive: ``$EM_CHROMIUM``, else Debian's (``/usr/bin/chromium``)."""
    for candidate in (os.environ.get("EM_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def require_browser() -> str:
    """Chromium's path, or skip the test with the reason (printed by pytest -ra)."""
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no Chromium: run scripts/install_chromium.sh as root (apt-get install chromium) or set EM_CHROMIUM"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    return path


def prepare_dagster_home(folder: Path) -> Path:
    """A Dagster home holding the project's dagster.yaml (the embedded default instance)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "dagster.yaml", folder / "dagster.yaml")
    return folder


@dataclass
class Webserver:
    """A running dagster-webserver: its base URL, process and log file."""

    url: str
    process: subprocess.Popen
    log: Path

    def graphql(self, query: str, variables: Mapping | None = None, timeout: float = 60) -> dict:
        """POST a GraphQL query; returns ``data`` (raises with the server's errors)."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(
            self.url + "/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


_LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


@contextlib.contextmanager
def start_webserver(
    dagster_home: Path,
    *,
    env: Mapping[str, str] | None = None,
    workspace: Path | None = None,
    module: str | None = None,
    cwd: Path = REPO,
    timeout: float = 180,
    read_only: bool = False,
) -> Iterator[Webserver]:
    """``dagster-webserver`` on a free loopback port until the block ends (then SIGTERM, by PID).

    Loads ``workspace`` (a workspace.yaml) or ``module`` (default: the repository's workspace.yaml), and
    waits until every code location is loaded; a location that fails to load fails the caller with its error.
    """
    port = free_port()
    target = ["-m", module] if module else ["-w", str(workspace or REPO / "workspace.yaml")]
    # the webserver as every topology serves it: behind the guard (em_platform/webserver.py)
    cmd = [sys.executable, "-m", "em_platform.webserver", "-h", "127.0.0.1", "-p", str(port), *target]
    if read_only:
        cmd.append("--read-only")
    full_env = {**os.environ, **(env or {}), "DAGSTER_HOME": str(dagster_home)}
    log = Path(tempfile.mkstemp(prefix="dagster-webserver-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Webserver(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_loaded(server, timeout)
        yield server
    finally:
        stop_process(proc)


def _wait_loaded(server: Webserver, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"dagster-webserver exited ({server.process.returncode}):\n{server.log_tail()}"
            )
        try:
            entries = server.graphql(_LOCATIONS, timeout=10)["workspaceOrError"]["locationEntries"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = str(exc)
        else:
            errors = [
                e for e in entries if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError"
            ]
            if errors:
                raise RuntimeError(
                    f"code location failed to load: {errors[0]['locationOrLoadError']['message']}"
                )
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
            last = f"locations {[(e['name'], e['loadStatus']) for e in entries]}"
        time.sleep(0.3)  # polling interval while waiting for the server to answer
    raise TimeoutError(f"dagster-webserver not ready after {timeout:g} s ({last}):\n{server.log_tail()}")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM the process group this harness started (by its PID), SIGKILL if it does not stop in time."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


@contextlib.contextmanager
def open_browser() -> Iterator:
    """A headless Chromium (Playwright ``Browser``) with a fresh profile; skips the test without one."""
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, timeout_ms: float = 120_000, viewport: dict | None = None, **context_options):
    """A page in a new browser context (fresh storage), with a generous default timeout for a busy machine;
    ``context_options`` as Playwright takes them (``http_credentials`` for a site behind a login, ...)."""
    context = browser.new_context(viewport=viewport or VIEWPORT, **context_options)
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    return page


def screenshot(page, name: str, *, full_page: bool = False) -> Path:
    """Save a PNG of the page as a test artifact and print where it is."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


def goto(page, url: str) -> None:
    """Open a UI page and wait until its network is idle (the UI loads its data by GraphQL)."""
    page.goto(url, wait_until="networkidle")


def _textured_fraction(png: bytes) -> float:
    """The share of a panel's 16 x 16 cells whose pixels vary (std > 8 grey levels): an empty panel is one
    grey with a few lines on it; a drawn EM image varies almost everywhere it covers."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32)
    cells = [c for band in np.array_split(grey, 16, axis=0) for c in np.array_split(band, 16, axis=1)]
    return sum(float(c.std()) > 8 for c in cells) / len(cells)


def open_in_neuroglancer(
    browser, ui_url: str, viewer_url: str, asset_path: str, partition: str, name: str, **context_options
):
    """From the partition's page, click its Neuroglancer link; wait until the viewer has fetched chunks of
    the image from `em-platform viewer` and its first panel shows them (polled, no fixed sleep). Returns the
    viewer's screenshot and the link."""
    page = new_page(browser, viewport=VIEWER_VIEWPORT, **context_options)
    goto(page, f"{ui_url}/assets/{asset_path}?view=partitions&partition={partition}")
    link = page.get_by_role("link", name="open at full resolution in Neuroglancer").first
    link.wait_for()
    link.scroll_into_view_if_needed()
    screenshot(page, f"asset_page_{name}")  # the link in the partition's metadata table
    href = link.get_attribute("href")
    assert href.startswith(f"{viewer_url}/v/em/#!"), href
    chunks: list[str] = []
    page.context.on(
        "response", lambda r: chunks.append(r.url) if "/data/" in r.url and "/c/" in r.url and r.ok else None
    )
    with (
        page.context.expect_page() if link.get_attribute("target") == "_blank" else _same_page(page) as opened
    ):
        link.click()
    viewer_page = opened.value
    viewer_page.wait_for_load_state()
    panel = viewer_page.locator(".neuroglancer-rendered-data-panel").first
    panel.wait_for()
    viewer_page.mouse.move(0, 0)  # the dimension legend shows only under the pointer
    textured = 0.0
    for _ in range(120):
        textured = _textured_fraction(panel.screenshot())
        if chunks and textured > 0.3:
            break
        viewer_page.wait_for_timeout(500)
    picture = screenshot(viewer_page, f"neuroglancer_{name}")
    assert chunks, f"{name}: Neuroglancer fetched no chunk of the image from the viewer"
    assert textured > 0.3, f"{name}: only {textured:.0%} of the viewer's first panel shows image texture"
    errors = viewer_page.locator(".neuroglancer-layer-item-error, .neuroglancer-status-error")
    assert errors.count() == 0, errors.all_inner_texts()
    return picture, href


class _same_page:
    """``expect_page``'s shape for a link that opens in the same tab."""

    def __init__(self, page):
        self.value = page

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
