"""Where cryo sessions are watched (``EM_CRYO_SESSIONS`` and the simulator's published root) and processed."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from em_platform.cryo.session import (
    SIMULATION_TAG,
    SessionError,
    TiltSeries,
    describe_movie_set,
    describe_tilt_series,
    strip_suffixes,
)
from em_platform.cryo.session_folders import SPA_SET, is_frame_set


class CryoSessionsResource(dg.ConfigurableResource):
    """Session roots by tag: ``sessions`` (EM_CRYO_SESSIONS) and ``simulation`` (<data root>/simulation)."""

    sessions: str
    simulation: str = ""
    # a series whose files changed this recently is still being written (the demo, whose simulator
    # publishes whole stacks at once, sets 0)
    settle_seconds: float = 10.0

    def roots(self) -> dict[str, Path]:
        roots = {"sessions": Path(self.sessions)}
        if self.simulation:
            roots["simulation"] = Path(self.simulation)
        return roots

    def tilt_series(self, key: str) -> TiltSeries:
        """The tilt series (or movie set) a partition key names (:func:`series_key`); a vanished one raises
        SessionError."""
        if "/" not in key:  # a simulated stack: <simulation root>/<spec>/<key>/<key>.mdoc
            root = self.roots().get(SIMULATION_TAG)
            if root:
                for mdoc in sorted(root.glob(f"*/{key}/*.mdoc")):
                    if strip_suffixes(mdoc.name) == key:
                        return describe_tilt_series(mdoc, root, SIMULATION_TAG)
            raise SessionError(
                f"partition {key!r}: no simulated stack {key} (<spec>/{key}/{key}.mdoc) in {root}"
            )
        tag, _, rest = key.partition("/")
        root = self.roots().get(tag)
        if root is None or not rest:
            raise SessionError(
                f"partition {key!r}: unknown session root {tag!r} (known: {', '.join(self.roots())})"
            )
        parent, _, name = (root / rest).as_posix().rpartition("/")
        folder = Path(parent)
        if (root / rest).is_dir():  # the series in a folder of its own name (series_key says it once)
            for mdoc in sorted((root / rest).glob("*.mdoc")):
                if strip_suffixes(mdoc.name) == name and not is_frame_set(mdoc):
                    return describe_tilt_series(mdoc, root, tag)
        if name == SPA_SET:
            mdocs = sorted(p for p in folder.glob("*.mdoc") if is_frame_set(p))
            if not mdocs:
                raise SessionError(f"partition {key!r}: no frame-set mdocs left in {folder}")
            return describe_movie_set(folder, mdocs, root, tag)
        for mdoc in sorted(folder.glob("*.mdoc")):
            if strip_suffixes(mdoc.name) == name:
                return describe_tilt_series(mdoc, root, tag)
        raise SessionError(f"partition {key!r}: no mdoc named {name}.mrc.mdoc / {name}.mdoc in {folder}")
