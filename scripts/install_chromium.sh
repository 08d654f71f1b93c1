#!/usr/bin/env bash
# Debian's Chromium for the web-UI browser tests (Playwright drives it; Playwright cannot download its own
# browser here). Best effort and never fatal: without root or apt-get it says so, and the browser tests skip
# with that reason. Set EM_CHROMIUM to use a Chromium installed elsewhere.
set -uo pipefail
for c in "${EM_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$c" ] && [ -x "$c" ]; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: not installed and no apt-get here; the browser tests will skip (set EM_CHROMIUM=/path/to/chromium)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "chromium: not installed and not root; the browser tests will skip (sudo apt-get install chromium)"
  exit 0
fi
echo "chromium: installing Debian's chromium for the browser tests (apt-get)"
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
}
# Package lists may be missing or stale on a fresh machine: update once and try again.
if ! apt_install 2>/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null 2>&1 || true
  apt_install || echo "chromium: apt-get install failed; the browser tests will skip"
fi
exit 0
