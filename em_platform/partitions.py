"""Partition definitions shared by assets, sensors and jobs."""

import dagster as dg

# One key per inbox entry (a file or a folder stack), added by the inbox sensor.
inbox_entries = dg.DynamicPartitionsDefinition(name="inbox_entries")

# One key per montage id, added by the montage sensor from the acquisition journal.
montages = dg.DynamicPartitionsDefinition(name="montages")
