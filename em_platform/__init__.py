"""em_platform: one Dagster code location for an electron-microscopy facility's data."""

__version__ = "0.1.0"
