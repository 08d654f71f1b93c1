"""The production topology (docker/) and the same services as local processes; no Dagster imports here."""
