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

# One key per live single-particle session (a movie set's folder, ``<root tag>/<folder>/micrographs``), added by
# the session sensor once `em-platform cryo-live` records its first exposure. Its exposures are rows, not
# partitions: tens of thousands a session would pass Dagster's limits within a month.
cryo_sessions = dg.DynamicPartitionsDefinition(name="cryo_sessions")
