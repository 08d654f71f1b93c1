#!/usr/bin/env bash
# Create .venv with the newest suitable Python and install em_platform with its test extras.
# Python 3.12 is preferred: the newest zarr, ome-zarr, numpy and tifffile need it (on 3.11 pip silently
# falls back to zarr 3.1.6 and ome-zarr 0.18, which em_platform also supports).
set -euo pipefail
venv=${1:-.venv}

find_python() {
  local c
  for c in python3.12 python3.13; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys' >/dev/null 2>&1; then command -v "$c"; return; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local v
    for v in 3.12 3.13; do
      local p
      p=$(pyenv prefix "$v" 2>/dev/null | head -n1 || true)
      if [ -n "$p" ] && [ -x "$p/bin/python3" ]; then echo "$p/bin/python3"; return; fi
    done
  fi
  if command -v python3 >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    command -v python3; return
  fi
  echo "em_platform needs Python >= 3.11 (3.12 preferred); none found on PATH or through pyenv." >&2
  exit 1
}

if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python)
  echo "creating $venv with $py ($("$py" --version 2>&1))"
  "$py" -m venv "$venv"
fi
# The machine's pip.conf may list local indexes that do not exist; their warnings are noise.
quiet_pip() { grep -v "^WARNING: Location" || true; }
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet_pip || true  # an old pip still installs
# uv resolves and installs the ~240 packages in a fraction of pip's time (a fresh .venv here: 30 s against
# 63 s, its cache empty); where uv cannot be had or cannot reach the index (a pip.conf mirror it does not
# read), pip installs them as before. setuptools' "Editable installation" note is informational.
if "$venv/bin/python" -m pip install -q uv 2>&1 | quiet_pip && [ -x "$venv/bin/uv" ] &&
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" -e ".[test,deploy]"; then
  :
else
  echo "uv could not install the packages; pip installs them (slower)"
  PYTHONWARNINGS="ignore:Editable installation" \
    "$venv/bin/python" -m pip install -q --no-compile -e ".[test,deploy]" 2>&1 | quiet_pip
fi
# Compiled on every core here, once, because a process under PYTHONDONTWRITEBYTECODE (set on this machine,
# in CI and in the images) would compile each module it imports again, every time. The packages' own test
# suites (16 of the 40 MB of sources) are never imported: not compiled (16 s of the 40 on 2 cores).
# -W: third-party files with invalid escapes in plain strings (ncempy 1.16's edstomo/preprocess.py:212 "\d")
# compile with a SyntaxWarning on Python 3.12 that a user can do nothing about.
"$venv/bin/python" -W ignore::SyntaxWarning -m compileall -qq -j 0 -x '/tests?/' \
  "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
"$venv/bin/python" -c "import em_platform, zarr, dagster; print('em_platform ready: zarr', zarr.__version__, 'dagster', dagster.__version__)"
# The browser tests of the web UI drive Debian's Chromium (best effort: they skip with the reason without it).
bash "$(dirname "$0")/install_chromium.sh"
bash "$(dirname "$0")/install_s3rver.sh" "$venv"
