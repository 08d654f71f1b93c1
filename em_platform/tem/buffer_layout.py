"""What a montage's folder in the acquisition buffer holds, named once for every step that reads or writes it.

The live step writes the processed tiles, ``montage_layout`` the layout, ``montage`` the fused image and its
description, ``montage_upload`` the metadata and then copies the folder as it is: the same names hold under
the montage's archived URL, so :class:`MontageBuffer` describes either folder.

Dagster-free, and free of the steps themselves, so each of them (and retention) can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

PROCESSED_TILES = "processed_tiles.zarr"  # one zarr array per tile, named by grid position
FUSED = "montage.ome.zarr"  # the fused montage (OME-Zarr multiscale)
LAYOUT = "layout.json"  # the solved tile placements and their QC
FUSED_INFO = "montage.json"  # the fused montage's shape, chunks and scales (MultiscaleInfo)
METADATA = "metadata.json"  # the archived folder's self-description, written by the upload
PROCESSED_TIFFS = "processed"  # optional TIFF copies of the processed tiles; never uploaded

UPLOADED = (PROCESSED_TILES, FUSED, LAYOUT, FUSED_INFO, METADATA)  # what montage_upload copies to storage

__all__ = ["UPLOADED", "MontageBuffer"]


@dataclass(frozen=True)
class MontageBuffer:
    """A montage's folder (a local path or a URL) and the paths of what the pipeline keeps in it."""

    folder: str

    def _in(self, name: str) -> str:
        return f"{self.folder.rstrip('/')}/{name}"

    @property
    def processed_tiles(self) -> str:
        return self._in(PROCESSED_TILES)

    @property
    def fused(self) -> str:
        return self._in(FUSED)

    @property
    def layout(self) -> str:
        return self._in(LAYOUT)

    @property
    def fused_info(self) -> str:
        return self._in(FUSED_INFO)

    @property
    def metadata(self) -> str:
        return self._in(METADATA)

    @property
    def processed_tiffs(self) -> str:
        return self._in(PROCESSED_TIFFS)

    def products(self) -> dict[str, str]:
        """The montage's products that must be in the folder before it is uploaded, by file name."""
        return {
            PROCESSED_TILES: self.processed_tiles,
            FUSED: self.fused,
            LAYOUT: self.layout,
            FUSED_INFO: self.fused_info,
        }
