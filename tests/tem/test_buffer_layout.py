"""A montage's buffer folder keeps the names it had on disk (archived montages and running buffers use them)."""

from em_platform.tem.buffer_layout import UPLOADED, MontageBuffer


def test_the_names_on_disk_are_those_of_every_archived_montage():
    local, archived = MontageBuffer("/buffer/m1"), MontageBuffer("s3://bucket/acquisition/m1/")
    assert local.processed_tiles == "/buffer/m1/processed_tiles.zarr"
    assert local.fused == "/buffer/m1/montage.ome.zarr"
    assert local.layout == "/buffer/m1/layout.json"
    assert local.fused_info == "/buffer/m1/montage.json"
    assert local.metadata == "/buffer/m1/metadata.json"
    assert local.processed_tiffs == "/buffer/m1/processed"
    assert archived.fused == "s3://bucket/acquisition/m1/montage.ome.zarr"
    assert UPLOADED == (
        "processed_tiles.zarr",
        "montage.ome.zarr",
        "layout.json",
        "montage.json",
        "metadata.json",
    )
    assert set(local.products()) == set(UPLOADED) - {"metadata.json"}  # the upload writes the metadata itself
