"""The folder of cryo-ET simulation specs (``EM_SIMULATIONS``)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


class SimulationSpecsResource(dg.ConfigurableResource):
    """Folder watched by the simulation sensor; each YAML/JSON spec there becomes ``num_stacks`` partitions."""

    path: str

    @property
    def folder(self) -> Path:
        return Path(self.path)
