"""Full-resolution viewing: every OME-Zarr the platform writes opens in Neuroglancer from one link.

- :mod:`em_platform.viewer.server`: `em-platform viewer`, Neuroglancer's client and the data root's images
  from one HTTP server (read only, images only, loopback unless configured).
- :mod:`em_platform.viewer.links`: the link (the whole view in the URL) that assets put in their metadata.
"""
