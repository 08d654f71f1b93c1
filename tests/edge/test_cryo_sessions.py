"""Cryo session folders under the inbox's containment rule (issue 50, point 5: they followed symlinks with no
rule): a session folder, an mdoc, a movie, a gain reference, a stack, ground truth or settings that resolve
outside the sessions root are refused with the field and the reason, before anything behind them is read, and
dead-lettered once by the sensor; a symlink that stays inside the root is followed, as the inbox follows one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from em_platform.cryo import session as sess
from em_platform.edge import Refused
from em_platform.resources import CatalogResource, CryoSessionsResource
from em_platform.sensors.cryo import cryo_sensor
from tests.cryo.synthetic import make_tilt_series


def _series(folder: Path, name: str) -> None:
    make_tilt_series(folder, name, size=64, angles=(-10, 0, 10), frames=2)


def _tick(instance, sessions: Path, catalog: CatalogResource, cursor: str | None = None):
    resources = {
        "cryo_sessions": CryoSessionsResource(sessions=str(sessions), settle_seconds=0),
        "catalog": catalog,
    }
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        return cryo_sensor(ctx)


def test_session_folders_and_files_symlinked_out_of_the_root_are_refused_and_dead_lettered(tmp_path):
    root, elsewhere = tmp_path / "sessions", tmp_path / "elsewhere"
    _series(root / "grid1", "TS_01")
    _series(elsewhere / "grid9", "TS_09")  # somebody else's session, outside the root
    os.symlink(elsewhere / "grid9", root / "linked_out")  # a session folder outside, linked in

    _series(root / "movie_out", "TS_02")  # one movie of a series is a link to a file outside
    movie = root / "movie_out" / "frames" / "TS_02_001_-10.0.tif"
    shutil.copy(movie, elsewhere / "private.tif")
    movie.unlink()
    os.symlink(elsewhere / "private.tif", movie)

    _series(root / "gain_out", "TS_03")  # the gain reference is a link out
    gain = root / "gain_out" / "gain_ref.mrc"
    gain.unlink()
    os.symlink(elsewhere / "grid9" / "gain_ref.mrc", gain)

    (root / "mdoc_out").mkdir()  # the mdoc itself is a link out (its stack beside the link)
    os.symlink(elsewhere / "grid9" / "TS_09.mrc.mdoc", root / "mdoc_out" / "TS_09.mrc.mdoc")
    shutil.copy(elsewhere / "grid9" / "TS_09.mrc", root / "mdoc_out" / "TS_09.mrc")

    os.symlink(root / "grid1", root / "alias")  # stays inside the root: followed (as the inbox's alias)
    os.symlink(root, root / "grid1" / "up")  # back up the tree: followed, but not walked twice

    catalog = CatalogResource(url=f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    with dg.instance_for_test() as instance:
        result = _tick(instance, root, catalog)
        assert sorted(r.partition_key for r in result.run_requests) == [
            "sessions/alias/TS_01",
            "sessions/grid1/TS_01",
        ]
        letters = catalog.dead_letters().letters()
        by_field = {x.field: x for x in letters}
        assert sorted(by_field) == ["gain reference", "mdoc", "movie", "session folder"]
        assert {(x.source, x.topic) for x in letters} == {("session", "cryo_tilt_series")}
        resolved_root = str(root.resolve())
        assert all("outside" in x.reason and resolved_root in x.reason for x in letters)
        assert by_field["session folder"].body == str(root / "linked_out")
        assert (
            "TS_02_001_-10.0.tif" in by_field["movie"].reason and str(elsewhere) in by_field["movie"].reason
        )
        assert by_field["mdoc"].body == str(root / "mdoc_out" / "TS_09.mrc.mdoc")

        again = _tick(instance, root, catalog, cursor=result.cursor)
        assert [x.times for x in catalog.dead_letters().letters()] == [1, 1, 1, 1]  # reported once
        assert "4 refused" in again.skip_reason.skip_message

    # a run asked for such a series (by hand, or after a swap since the tick) reads nothing of it either
    resource = CryoSessionsResource(sessions=str(root))
    with pytest.raises(Refused, match="movie .* outside"):
        resource.tilt_series("sessions/movie_out/TS_02")
    with pytest.raises(Refused, match="mdoc .* outside"):
        resource.tilt_series("sessions/linked_out/TS_09")
    assert resource.tilt_series("sessions/alias/TS_01").tilts
    catalog.dead_letters().dispose()


@pytest.mark.parametrize(
    "name, field",
    [
        ("TS_01.mrc", "stack"),
        ("ground_truth.json", "ground truth"),
        ("em_session.yaml", "session settings"),
    ],
)
def test_every_file_a_series_names_must_stay_inside_the_root(tmp_path, name, field):
    root, outside = tmp_path / "sessions", tmp_path / "outside"
    _series(root / "grid1", "TS_01")
    outside.mkdir()
    target = outside / name
    if name == "em_session.yaml":
        target.write_text("not: [valid yaml")  # read, it would be a SessionError: refused, it is never read
    else:
        shutil.move(root / "grid1" / name, target)
    (root / "grid1" / name).unlink(missing_ok=True)
    os.symlink(target, root / "grid1" / name)
    found, errors = sess.discover(root, "sessions")  # the simple form reports it as an error, with the reason
    assert found == [] and "outside" in errors["sessions/grid1/TS_01"]
    scan = sess.scan_sessions(root, "sessions")
    assert scan.found == [] and scan.errors == {}
    [entry] = scan.refused.values()
    assert entry.key == "sessions/grid1/TS_01" and entry.refused.field == field
    assert f"resolves to {target}" in str(entry.refused)


def test_a_single_particle_set_with_a_movie_out_of_the_root_is_refused(tmp_path):
    from tests.cryo.synthetic import make_movie_set

    root, outside = tmp_path / "sessions", tmp_path / "outside"
    make_movie_set(root / "grid2" / "spa", n_movies=2, size=64, frames=2, seed=1)
    outside.mkdir()
    movie = next((root / "grid2" / "spa").rglob("*.tif"))
    shutil.move(movie, outside / movie.name)
    os.symlink(outside / movie.name, movie)
    assert sess.discover(root, "sessions")[0] == []
    scan = sess.scan_sessions(root, "sessions")
    [entry] = scan.refused.values()
    assert (entry.key, entry.refused.field) == ("sessions/grid2/spa/micrographs", "movie")
