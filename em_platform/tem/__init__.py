"""Live TEM acquisition (the Allen TilEM system's downstream half): protocol, journal, tiles, QC. No Dagster."""
