#!/usr/bin/env bash
# s3rver: the file-backed S3 server `make deploy-local` runs in place of MinIO (its objects survive restarts;
# moto, in memory, stays in the tests). Installed with npm into the venv; without npm, deploy-local says so.
set -euo pipefail
venv=${1:-.venv}
version=3.7.1
if [ -x "$venv/s3rver/node_modules/.bin/s3rver" ]; then exit 0; fi
if ! command -v npm >/dev/null 2>&1; then
  echo "note: npm not found; s3rver (the object store of make deploy-local) not installed (Debian: apt-get install npm)" >&2
  exit 0
fi
# npm's summary ("added 116 packages in 5s") says nothing the line below does not
npm install --prefix "$venv/s3rver" --no-audit --no-fund --loglevel=error "s3rver@$version" 2>&1 \
  | grep -v -e "Unknown user config" -e "^added [0-9]* packages" -e "^$" || true
test -x "$venv/s3rver/node_modules/.bin/s3rver" && echo "s3rver $version installed in $venv/s3rver"
