"""``make images``: the platform's two images, built by the host's container engine from the official Python
image, or, where no registry can be reached, from a Debian base made here.

Docker (a running engine) or podman builds them; both take ``docker/Dockerfile``'s ``BASE_IMAGE``. When the
official image cannot be had (no registry answers: pulls fail at once here), the base is made from Debian's
own packages, which every Debian host reaches: ``debootstrap --variant=minbase`` into a temporary folder
with the mirror the host's apt uses, imported as ``localhost/em-platform-debian:<suite>``, then
``docker/base/Dockerfile`` adds Debian's Python. The same Debian base carries the stand-ins for the official
server images compose names (``docker/standin/``; see :mod:`em_platform.deploy.standins`).

Cached: the Debian base is made again only when its inputs (suite, mirror, variant, this module's recipe)
change (a label on the image records them); every build keeps the engine's layer cache, and the
dependencies sit in a layer below the code, so a change to the code rebuilds one layer.

pip and npm inside a build trust the host's CA bundle where one is configured (a TLS-inspecting proxy): it
is given to the build as the secret ``ca-bundle``, mounted for the steps that download and never stored.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from em_platform.deploy.standins import DEBIAN_SUITE, STANDINS

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
# podman's settings for this platform's containers (runc; file limits a host that cannot raise them allows)
CONTAINERS_CONF = DOCKER / "podman" / "containers.conf"
OFFICIAL_BASE = "python:3.12-slim"
PYTHON_BASE = f"localhost/em-platform-python:{DEBIAN_SUITE}"
INPUTS_LABEL = "org.em-platform.inputs"
PULL_TIMEOUT_S = 120


class ImageError(RuntimeError):
    """An image could not be built; the message names it and what to do."""


@dataclass(frozen=True)
class Build:
    """One image: its tag, Dockerfile and build context (relative to the repository)."""

    tag: str
    dockerfile: str
    context: str = "."

    @property
    def ignorefile(self) -> Path:
        return REPO / f"{self.dockerfile}.dockerignore"


def platform_builds(em_image: str = "em-platform:latest", dagster_image: str = "em-platform-dagster:latest"):
    return (Build(em_image, "docker/Dockerfile"), Build(dagster_image, "docker/Dockerfile.dagster"))


# -- the engine -------------------------------------------------------------------------------------------


def engine_env() -> dict[str, str]:
    """The environment every engine command runs in: podman reads the platform's containers.conf."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def engine(choice: str | None = None) -> str:
    """``docker`` where a Docker engine answers, else ``podman``; ``EM_CONTAINER_ENGINE`` chooses."""
    choice = choice or os.environ.get("EM_CONTAINER_ENGINE", "")
    if choice:
        if choice not in ("docker", "podman"):
            raise ImageError(f"EM_CONTAINER_ENGINE={choice!r}: expected docker or podman")
        if not shutil.which(choice):
            raise ImageError(f"EM_CONTAINER_ENGINE={choice}: `{choice}` is not installed")
        return choice
    if shutil.which("docker") and _quiet(["docker", "info"], timeout=20):
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise ImageError(
        "no container engine: neither a Docker engine answers nor podman is installed "
        "(Debian: apt-get install podman runc; scripts/install_podman.sh does it)"
    )


def _quiet(argv: Sequence[str], timeout: float = 60) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=engine_env()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def image_exists(tool: str, tag: str) -> bool:
    if tool == "podman":
        return _quiet([tool, "image", "exists", tag])
    return _quiet([tool, "image", "inspect", tag])


def label(tool: str, tag: str, name: str) -> str:
    done = subprocess.run(
        [tool, "image", "inspect", "--format", f'{{{{ index .Config.Labels "{name}" }}}}', tag],
        capture_output=True,
        text=True,
        env=engine_env(),
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def obtainable(tool: str, tag: str) -> bool:
    """The image is here or a registry gives it (bounded: a host without registries fails fast or times out)."""
    return image_exists(tool, tag) or _quiet([tool, "pull", "-q", tag], timeout=PULL_TIMEOUT_S)


# -- the Debian base ---------------------------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror the host's apt uses (deb.debian.org where it names none)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url in re.findall(r"(?:^deb\s+(?:\[[^]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.M):
            if url.rstrip("/").endswith("/debian"):
                return url.rstrip("/")
    return "http://deb.debian.org/debian"


def _run(argv: Sequence[str], what: str, **kwargs) -> None:
    print(f"+ {' '.join(argv)}", flush=True)
    done = subprocess.run(argv, env=engine_env(), **kwargs)
    if done.returncode != 0:
        raise ImageError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}")


def debian_base(tool: str, mirror: str | None = None, suite: str = DEBIAN_SUITE) -> str:
    """``localhost/em-platform-debian:<suite>``: a minimal Debian made by debootstrap, imported once per inputs."""
    mirror = mirror or apt_mirror()
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    recipe = f"{suite} {mirror} {security} minbase v1"
    inputs = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    tag = f"localhost/em-platform-debian:{suite}"
    if image_exists(tool, tag) and label(tool, tag, INPUTS_LABEL) == inputs:
        print(f"{tag}: up to date ({recipe})")
        return tag
    if not shutil.which("debootstrap"):
        raise ImageError(
            "no registry gives the official images and debootstrap is not installed to make a Debian base "
            "(Debian: apt-get install debootstrap; scripts/install_podman.sh does it)"
        )
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="em-debian-") as tmp:
        root = Path(tmp) / "rootfs"
        _run(
            ["debootstrap", "--variant=minbase", suite, str(root), mirror],
            f"debootstrap of Debian {suite} from {mirror}",
            stdout=subprocess.DEVNULL,
        )
        (root / "etc/apt/sources.list").write_text(
            f"deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\n"
            f"deb {security} {suite}-security main\n"
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):  # downloaded .debs and indexes
            for entry in (root / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        _run(
            [tool, "import", "--change", f"LABEL {INPUTS_LABEL}={inputs}", "-", tag],
            f"import of the Debian {suite} base",
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
        )
        tar.wait()
    print(f"{tag}: made from {mirror} in {time.monotonic() - began:.0f} s")
    return tag


# -- builds -----------------------------------------------------------------------------------------------


def ca_bundle() -> Path | None:
    """The CA bundle pip on this host is told to trust (pip.conf's ``cert``), or the system one."""
    for conf in (Path("/etc/pip.conf"), Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"):
        try:
            m = re.search(r"^\s*cert\s*=\s*(\S+)", conf.read_text(), re.M)
        except OSError:
            continue
        if m and Path(m.group(1)).is_file():
            return Path(m.group(1))
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    return system if system.is_file() else None


def build(tool: str, image: Build, build_args: dict[str, str] | None = None) -> float:
    """Build one image; returns the seconds it took."""
    argv = [tool, "build", "-t", image.tag, "-f", str(REPO / image.dockerfile)]
    for key, value in (build_args or {}).items():
        argv += ["--build-arg", f"{key}={value}"]
    bundle = ca_bundle()
    if bundle:
        argv += ["--secret", f"id=ca-bundle,src={bundle}"]
    if image.ignorefile.exists() and tool == "podman":  # Docker finds <Dockerfile>.dockerignore itself
        argv += ["--ignorefile", str(image.ignorefile)]
    argv.append(str(REPO / image.context))
    env = engine_env()
    if tool == "docker":
        env.setdefault("DOCKER_BUILDKIT", "1")  # secret and cache mounts
    began = time.monotonic()
    print(f"+ {' '.join(argv)}", flush=True)
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took = time.monotonic() - began
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        raise ImageError(f"building {image.tag} from {image.dockerfile} failed:\n{tail}")
    print(f"{image.tag}: built in {took:.0f} s")
    return took


def size(tool: str, tag: str) -> int:
    done = subprocess.run(
        [tool, "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True,
        text=True,
        env=engine_env(),
    )
    return int(done.stdout.strip() or 0)


def build_all(tool: str | None = None, base: str | None = None, standins: bool | None = None) -> dict:
    """Build the platform's images (and, where the official server images cannot be had, their stand-ins).

    ``base``: the base image (``EM_BASE_IMAGE``; default the official Python image where the engine gets it,
    else the Debian base made here). ``standins``: build the stand-ins (default: when the base is Debian's).
    Returns what was built, with times and sizes, for the docs and the tests."""

    tool = tool or engine()
    base = base or os.environ.get("EM_BASE_IMAGE", "")
    began = time.monotonic()
    report: dict = {"engine": tool, "images": {}}
    debian = None
    if not base:
        if obtainable(tool, OFFICIAL_BASE):
            base = OFFICIAL_BASE
        else:
            print(f"{OFFICIAL_BASE} cannot be pulled here: making a Debian base instead")
            debian = debian_base(tool)
            report["images"][PYTHON_BASE] = {
                "seconds": build(
                    tool,
                    Build(PYTHON_BASE, "docker/base/Dockerfile", "docker/base"),
                    {"DEBIAN_IMAGE": debian},
                )
            }
            base = PYTHON_BASE
    report["base"] = base
    for image in platform_builds():
        report["images"][image.tag] = {"seconds": build(tool, image, {"BASE_IMAGE": base})}
    if standins if standins is not None else debian is not None:
        debian = debian or debian_base(tool)
        for standin in STANDINS:
            if standin.build:
                image = Build(standin.image, standin.build, str(Path(standin.build).parent))
                report["images"][image.tag] = {"seconds": build(tool, image, {"DEBIAN_IMAGE": debian})}
    for tag, entry in report["images"].items():
        entry["bytes"] = size(tool, tag)
    report["seconds"] = round(time.monotonic() - began, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m em_platform.deploy images", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--engine", choices=("docker", "podman"), help="default: EM_CONTAINER_ENGINE, else detected"
    )
    parser.add_argument(
        "--base", help="base image of both Dockerfiles (default: EM_BASE_IMAGE, else detected)"
    )
    args = parser.parse_args(argv)
    try:
        report = build_all(args.engine, args.base)
    except ImageError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    for tag, entry in report["images"].items():
        print(f"  {tag:<44} {entry['bytes'] / 1e6:7.0f} MB  built in {entry['seconds']:.0f} s")
    print(f"images ready in {report['seconds']:.0f} s ({report['engine']}, base {report['base']})")
    return 0
