"""Cryo-EM/ET processing on the CPU (the cryoem-services role): motion correction, CTF estimation, tilt-series
alignment, tomogram reconstruction, denoising, thumbnails, results tables and ground-truth evaluation.

Dagster-free: plain functions on numpy/dask arrays and paths. Conventions follow the simulator contract
(arrays in numpy order (n_tilts, ny, nx); x the fast axis; positions (x, y); defocus positive = underfocus,
in Å; angles counter-clockwise in the (x, y) frame with y along increasing row index).
"""
