"""A complete em_platform Definitions bound to a temporary data root, inbox and catalog."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from em_platform.definitions import build_definitions
from em_platform.resources import build_resources
from em_platform.settings import Settings, load_settings


@dataclass
class TestPlatform:
    settings: Settings
    defs: dg.Definitions

    @property
    def inbox(self) -> Path:
        return Path(self.settings.inbox)

    @property
    def data_root(self) -> Path:
        return Path(self.settings.data_root)


def make_platform(
    tmp_path: Path,
    *,
    catalog_url: str | None = None,
    data_root: str | None = None,
    settle: float = 0.0,
    extra_env: dict | None = None,
) -> TestPlatform:
    env = {
        "EM_DATA_ROOT": data_root or str(tmp_path / "data"),
        "EM_INBOX": str(tmp_path / "inbox"),
        "EM_INBOX_SETTLE_SECONDS": str(settle),
        "EM_SCOPE_SHARES": str(tmp_path / "tiles"),  # where the tests' simulated scopes write their tiles
        **({"EM_CATALOG_URL": catalog_url} if catalog_url else {}),
        **(extra_env or {}),
    }
    settings = load_settings(env)
    Path(settings.inbox).mkdir(parents=True, exist_ok=True)
    return TestPlatform(settings, build_definitions(build_resources(settings)))
