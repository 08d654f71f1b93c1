#!/usr/bin/env bash
# A real single-node SLURM for the dask-jobqueue tests (tests/slurm/, harness in tests/support/slurm.py):
# Debian's slurm-wlm (slurmctld, slurmd, sbatch...) and munge. Best effort and never fatal, as root only (as
# install_podman.sh does); without it the SLURM tests skip and say what is missing. Nothing is started or
# enabled here: the tests run their own daemons with a configuration of their own.
set -uo pipefail
missing=()
# the daemons are in /usr/sbin, which a user's PATH may lack
for tool in slurmctld slurmd sbatch munged; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${missing[*]} not installed (Debian, as root: apt-get install slurm-wlm munge); the SLURM tests will skip" >&2
  exit 0
fi
echo "slurm: installing Debian's slurm-wlm and munge for the SLURM tests (apt-get)"
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq slurm-wlm munge >/dev/null
}
# Package lists may be missing or stale on a fresh machine: update once and try again.
if ! apt_install 2>/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null 2>&1 || true
  apt_install >/dev/null 2>&1 || echo "note: apt-get could not install slurm-wlm and munge; the SLURM tests will skip" >&2
fi
exit 0
