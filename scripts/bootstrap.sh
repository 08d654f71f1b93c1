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
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# setuptools' "Editable installation" note is informational (how an editable install finds the package).
# pip compiles every installed module one file at a time; compileall does the same on every core afterwards
# (a fresh .venv 8-13 s sooner on 2 cores). Compiled here because a process under PYTHONDONTWRITEBYTECODE
# would compile each module it imports again, every time.
PYTHONWARNINGS="ignore:Editable installation" \
  "$venv/bin/python" -m pip install -q --no-compile -e ".[test,deploy]" 2>&1 | grep -v "^WARNING: Location" || true
# -W: third-party files with invalid escapes in plain strings (ncempy 1.16's edstomo/preprocess.py:212 "\d")
# compile with a SyntaxWarning on Python 3.12 that a user can do nothing about.
"$venv/bin/python" -W ignore::SyntaxWarning -m compileall -qq -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
"$venv/bin/python" -c "import em_platform, zarr, dagster; print('em_platform ready: zarr', zarr.__version__, 'dagster', dagster.__version__)"
# The browser tests of the web UI drive Debian's Chromium (best effort: they skip with the reason without it).
bash "$(dirname "$0")/install_chromium.sh"
bash "$(dirname "$0")/install_s3rver.sh" "$venv"
