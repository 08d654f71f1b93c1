"""The platform's Prometheus metrics: declared once (:mod:`.catalogue`), counted where the work happens, and
served by each long-running service at an address of its own (:mod:`.exporter`). Labels take values from
small fixed sets (a scope, a verdict, a reason), never a tile or montage id: a year of tiles must not become
a year of time series."""
