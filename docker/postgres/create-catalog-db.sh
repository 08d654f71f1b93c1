#!/bin/sh
# Runs once, when the postgres container starts on an empty volume: the catalog (records, status history,
# acquisition journal, TEM tile records) gets a database of its own beside Dagster's.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${EM_CATALOG_DB:-em_catalog}\" OWNER \"$POSTGRES_USER\""
