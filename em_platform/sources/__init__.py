"""Public EM sources (EMPIAR, EPFL CVLab, FlyEM DVID + neuPrint, IDR, OpenOrganelle) and the shared
download layer they use. Dagster-free: each source module is a client a scientist can call directly.

Every source implements :class:`em_platform.sources.dataset.Source`: a cheap ``check()`` of what the
source holds now (its fingerprint), and ``fetch()`` that downloads resumably into a local work folder
and returns a lazy, calibrated :class:`~em_platform.formats.Volume`. This package never imports
:mod:`em_platform.ingest`: :mod:`em_platform.ingest.public` turns a fetch into a published OME-Zarr image
with a catalog record.
"""
