"""The inbox folder users drop files into."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


class InboxResource(dg.ConfigurableResource):
    """Folder watched by the inbox sensor; entries count as arrived after ``settle_seconds`` without change."""

    path: str
    settle_seconds: float = 5.0

    @property
    def folder(self) -> Path:
        return Path(self.path)
