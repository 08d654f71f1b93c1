"""Partition definitions shared by assets, sensors and jobs."""

import dagster as dg

# One key per inbox entry (a file or a folder stack), added by the inbox sensor.
inbox_entries = dg.DynamicPartitionsDefinition(name="inbox_entries")

# One key per montage id, added by the montage sensor from the acquisition journal.
montages = dg.DynamicPartitionsDefinition(name="montages")

# One key per simulated tilt series, ``<spec name>_<NNN>``, added by the simulation sensor from EM_SIMULATIONS.
simulations = dg.DynamicPartitionsDefinition(name="simulations")

# One key per cryo tilt series (or single-particle movie set), ``<root tag>/<path of its mdoc>``, added by the
# cryo sensor from EM_CRYO_SESSIONS and the simulator's published root.
cryo_tilt_series = dg.DynamicPartitionsDefinition(name="cryo_tilt_series")
