"""The metadata catalog: record schema, status machine, SQL store and consolidated exports (no Dagster)."""
