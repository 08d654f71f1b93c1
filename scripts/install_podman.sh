#!/usr/bin/env bash
# The container engine for `make images`, `make compose-up` and `make test-compose` where no Docker engine
# runs: Debian's podman with the runc runtime, and debootstrap to make a Debian base image where no registry
# answers. Best effort, as root only (as install_chromium.sh does); without it those targets say what is missing.
set -uo pipefail
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then exit 0; fi
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${missing[*]} not installed (Debian, as root: apt-get install podman runc debootstrap)" >&2
  exit 0
fi
echo "container engine: installing podman, runc and debootstrap (apt-get)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  podman runc debootstrap netavark aardvark-dns conmon containernetworking-plugins uidmap >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
       --no-install-recommends podman runc debootstrap netavark aardvark-dns conmon \
       containernetworking-plugins uidmap >/dev/null 2>&1; } \
  || echo "note: apt-get could not install podman (make images / compose-up / test-compose need it)" >&2
