"""Where the pixel work runs beyond one machine: a facility's batch scheduler (SLURM) through dask-jobqueue."""
