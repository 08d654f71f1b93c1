"""The edge module's rules on hostile values: ids, one-component names, paths under a root, storage keys,
tile paths on the scope shares; and the storage root and the settings that use them."""

from __future__ import annotations

import os

import pytest

from em_platform.edge import (
    DATASET_ID,
    MONTAGE_ID,
    TILE_ID,
    Refused,
    check_file_name,
    check_relative_key,
    check_tem_message,
    inside,
    join_key,
    under_shares,
)
from em_platform.settings import ConfigError, load_settings
from em_platform.storage import DataStore

TRAVERSALS = ["../../../../elsewhere", "..", "a/../../b", "/etc", "a/b", "a\\..\\b", "a\x00b", "", ".hidden"]


@pytest.mark.parametrize("value", [*TRAVERSALS, "a..b", "é", "x" * 65, "ok\n", 7, None])
def test_wire_ids_refuse_traversal_separators_and_oversize(value):
    for kind in (MONTAGE_ID, TILE_ID):
        with pytest.raises(Refused) as exc:
            kind.check(value, "montage_id")
        assert exc.value.field == "montage_id" and exc.value.reason


def test_wire_ids_accept_what_scopes_send():
    for good in ["3f1c2b9e-1234-4abc-8def-0123456789ab", "m-1", "2024_01_05.grid3", "x" * 64]:
        assert MONTAGE_ID.check(good) == good and TILE_ID.check(good) == good
    for good in ["11759", "idr0086-9846137", "jrc_hela-2/fibsem-uint16/s4"]:
        assert DATASET_ID.check(good) == good
    for bad in ["../x", "a//b", "a/", "/a", "a/../b", "a/.b", "x" * 129]:
        with pytest.raises(Refused):
            DATASET_ID.check(bad)


@pytest.mark.parametrize("value", ["..", ".", "a/b", "a\\b", ".hidden", "a\x01", "a...b", "", "é" * 128])
def test_file_names_are_one_harmless_component(value):
    with pytest.raises(Refused):
        check_file_name(value)
    assert check_file_name("My scan (2) ü.tif") == "My scan (2) ü.tif"
    assert check_relative_key("sessions/grid 1/TS_01") == "sessions/grid 1/TS_01"
    if "/" not in value:  # as one segment of a key it is refused too
        with pytest.raises(Refused):
            check_relative_key(f"sessions/{value}/TS_01")


def test_inside_resolves_and_refuses_what_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", root / "link_out")
    os.symlink(root / "sub", root / "link_in")
    assert inside(root, "sub", "f.tif") == (root / "sub" / "f.tif").resolve()
    assert inside(root, "link_in") == (root / "sub").resolve()  # a symlink that stays inside is fine
    for parts in [("../secret.txt",), ("sub", "..", ".."), ("/etc/passwd",), ("link_out",), ("a\x00",)]:
        with pytest.raises(Refused, match="outside|NUL"):
            inside(root, *parts, field="entry")


def test_storage_keys_and_the_store_never_leave_their_prefix(tmp_path):
    assert (
        join_key("bucket/root", "acquisition", "m-1", "fused.ome.zarr")
        == "bucket/root/acquisition/m-1/fused.ome.zarr"
    )
    assert join_key("bucket/root", "cryo/sessions/TS_01") == "bucket/root/cryo/sessions/TS_01"
    store = DataStore(str(tmp_path / "data"))
    for hostile in ["../../../../elsewhere", "/etc", "a/../..", "a//b", "a\\..\\b"]:
        with pytest.raises(Refused):
            store.path("acquisition", hostile, "processed_tiles.zarr")
        with pytest.raises(Refused):
            store.url(hostile)
    assert store.path("acquisition", "m-1") == f"{tmp_path / 'data'}/acquisition/m-1"


def test_tile_paths_must_resolve_onto_a_scope_share(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "outside.tiff").write_bytes(b"II*\x00")
    os.symlink(tmp_path / "outside.tiff", share / "link.tiff")
    assert under_shares(str(share / "m" / "t.tiff"), [share]) == share.resolve() / "m" / "t.tiff"
    for path in [
        "/etc/passwd",
        str(share / ".." / "outside.tiff"),
        str(share / "link.tiff"),
        "rel/t.tiff",
        "",
    ]:
        with pytest.raises(Refused):
            under_shares(path, [share])
    with pytest.raises(Refused, match="no scope share"):
        under_shares(str(share / "t.tiff"), [])
    raw = {"tile_id": "t-1", "montage_id": "m-1", "path": "/etc/passwd", "row": 0, "column": 0}
    with pytest.raises(Refused) as exc:
        check_tem_message("tile.raw", raw, [share])
    assert exc.value.field == "path"
    check_tem_message(
        "tile.raw", {**raw, "montage_id": ""}
    )  # a calibration frame: no montage, no share given
    with pytest.raises(Refused) as exc:
        check_tem_message("montage.complete", {"montage_id": "m-1", "tiles": {"../t": {}}})
    assert exc.value.field == "tiles"


def test_scope_shares_setting(tmp_path):
    env = {"EM_DATA_ROOT": str(tmp_path / "data")}
    assert load_settings(env).scope_shares == (str(tmp_path / "data" / "scope"),)  # the simulator's folder
    two = f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"
    assert load_settings({**env, "EM_SCOPE_SHARES": two}).scope_shares == (
        str(tmp_path / "a"),
        str(tmp_path / "b"),
    )
    for bad in ["relative/share", "s3://bucket/share"]:
        with pytest.raises(ConfigError, match="EM_SCOPE_SHARES"):
            load_settings({**env, "EM_SCOPE_SHARES": bad})
