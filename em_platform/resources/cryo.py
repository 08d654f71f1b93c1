"""Where cryo sessions are watched (``EM_CRYO_SESSIONS`` and the simulator's published root) and processed."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from em_platform.cryo.session import (
    SPA_SET,
    SessionError,
    TiltSeries,
    describe_movie_set,
    describe_tilt_series,
    is_frame_set,
    strip_suffixes,
)


class CryoSessionsResource(dg.ConfigurableResource):
    """Session roots by tag: ``sessions`` (EM_CRYO_SESSIONS) and ``simulation`` (<data root>/simulation)."""

    sessions: str
    simulation: str = ""

    def roots(self) -> dict[str, Path]:
        roots = {"sessions": Path(self.sessions)}
        if self.simulation:
            roots["simulation"] = Path(self.simulation)
        return roots

    def tilt_series(self, key: str) -> TiltSeries:
        """The tilt series (or movie set) a partition key names; a vanished one raises SessionError."""
        tag, _, rest = key.partition("/")
        root = self.roots().get(tag)
        if root is None or not rest:
            raise SessionError(
                f"partition {key!r}: unknown session root {tag!r} (known: {', '.join(self.roots())})"
            )
        folder, _, name = (root / rest).as_posix().rpartition("/")
        folder = Path(folder)
        if name == SPA_SET:
            mdocs = sorted(p for p in folder.glob("*.mdoc") if is_frame_set(p))
            if not mdocs:
                raise SessionError(f"partition {key!r}: no frame-set mdocs left in {folder}")
            return describe_movie_set(folder, mdocs, root, tag)
        for mdoc in sorted(folder.glob("*.mdoc")):
            if strip_suffixes(mdoc.name) == name:
                return describe_tilt_series(mdoc, root, tag)
        raise SessionError(f"partition {key!r}: no mdoc named {name}.mrc.mdoc / {name}.mdoc in {folder}")
