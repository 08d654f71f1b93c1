"""Full-resolution viewing: every OME-Zarr the platform writes opens in Neuroglancer from one link.

- :mod:`em_platform.viewer.server`: `em-platform viewer`, Neuroglancer's client and the data root's images
  from one HTTP server (read only, images only, loopback unless configured).
- :mod:`em_platform.viewer.images`: which ``/data/<key>`` may be served (files of published OME-Zarr
  images only, checked as asked and again where they resolve).
- :mod:`em_platform.viewer.headers`: the request's ``Host``, ``Range`` and body length, parsed strictly.
- :mod:`em_platform.viewer.links`: the link (the whole view in the URL) that assets put in their metadata.
"""
