#!/usr/bin/env bash
# Debian's Prometheus and Alertmanager: promtool checks the alert rules in make test (docker/prometheus), and
# the operations suite runs both for real. Best effort and never fatal, as root only (as install_slurm.sh
# does); without them those tests skip and say what is missing. Nothing is started or enabled here: the tests
# and make deploy-local run their own, with a configuration of their own (RUNLEVEL=1 keeps invoke-rc.d from
# starting the packages' services where an init system would).
set -uo pipefail
missing=()
for tool in prometheus promtool prometheus-alertmanager; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/bin/$tool" ] || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${missing[*]} not installed (Debian, as root: apt-get install prometheus prometheus-alertmanager); the alert-rule tests will skip" >&2
  exit 0
fi
echo "prometheus: installing Debian's prometheus and prometheus-alertmanager for the alert-rule tests (apt-get)"
apt_install() {
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
}
# Package lists may be missing or stale on a fresh machine: update once and try again.
if ! apt_install 2>/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null 2>&1 || true
  apt_install >/dev/null 2>&1 || echo "note: apt-get could not install prometheus; the alert-rule tests will skip" >&2
fi
exit 0
