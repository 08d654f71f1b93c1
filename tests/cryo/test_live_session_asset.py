"""A live session in Dagster: the session sensor adds it as a partition of ``cryo_sessions`` once cryo-live has
recorded an exposure and asks for ``cryo_live/session`` then, and again only after the session changed and the
publishing interval passed; the materialization is the session's dashboard, report and RELION project."""

from __future__ import annotations

import json
import time

import dagster as dg
import starfile

from em_platform.assets.cryo_live import session
from em_platform.cryo.curation import NAMES
from em_platform.cryo.exposures_db import ExposureStore
from em_platform.cryo.live_sessions import LiveCryo
from em_platform.resources import CatalogResource, CryoSessionsResource, StorageResource
from em_platform.sensors import cryo_sessions as sensor_module
from em_platform.sensors.cryo_sessions import cryo_session_sensor
from tests.cryo.synthetic import make_movie_set

KEY = "sessions/grid1/micrographs"


def _tick(instance, catalog, cursor=None):
    with dg.build_sensor_context(instance=instance, resources={"catalog": catalog}, cursor=cursor) as ctx:
        result = cryo_session_sensor(ctx)
        return result, ctx.cursor if result.cursor is None else result.cursor


def test_a_live_session_is_added_published_and_published_again_only_once_it_changed(tmp_path, monkeypatch):
    root, data = tmp_path / "sessions", tmp_path / "data"
    make_movie_set(root / "grid1", n_movies=3, size=256)
    off = "\n".join(f"  {name}: null" for name in NAMES if name != "max_total_motion_a")
    (root / "grid1" / "em_session.yaml").write_text(f"curation:\n  max_total_motion_a: 1000\n{off}\n")
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    catalog = CatalogResource(url=url)
    resources = {
        "catalog": catalog,
        "cryo_sessions": CryoSessionsResource(sessions=str(root), simulation=str(data / "simulation")),
        "storage": StorageResource(
            root_url=str(data), buffer_root=str(tmp_path / "buffer"), downloads_root=str(tmp_path / "dl")
        ),
    }
    service = LiveCryo({"sessions": root}, ExposureStore(url), data / "cryo" / "live")
    with dg.instance_for_test() as instance:
        result, cursor = _tick(instance, catalog)
        assert result.run_requests == [] and "no session changed" in result.skip_reason.skip_message
        service.scan()
        result, cursor = _tick(instance, catalog, cursor)  # landed, none processed yet: published at once
        assert [r.partition_key for r in result.run_requests] == [KEY]
        assert [k for req in result.dynamic_partitions_requests for k in req.partition_keys] == [KEY]
        instance.add_dynamic_partitions("cryo_sessions", [KEY])
        while service.process_next():
            pass
        result, cursor = _tick(instance, catalog, cursor)  # changed, but published a moment ago
        assert result.run_requests == [] and "1 session(s) changed" in result.skip_reason.skip_message
        later = time.time() + sensor_module.PUBLISH_EVERY_S + 1
        monkeypatch.setattr(sensor_module, "clock", lambda: later)
        result, cursor = _tick(instance, catalog, cursor)  # after the interval: published again
        assert [r.partition_key for r in result.run_requests] == [KEY]
        result, _ = _tick(instance, catalog, cursor)
        assert result.run_requests == []  # nothing changed since
        run = dg.materialize([session], instance=instance, partition_key=KEY, resources=resources)
    service.store.dispose()
    meta = run.asset_materializations_for_node("cryo_live__session")[0].metadata
    assert (meta["exposures"].value, meta["processed"].value, meta["failed"].value) == (3, 3, 0)
    assert meta["accepted"].value + 0 <= 3 and meta["acceptance_pct"].value == round(
        100 * meta["accepted"].value / 3, 1
    )
    assert 0 < meta["lag_s_max"].value < 600
    assert (
        "data:image/png;base64," in meta["progress"].value
        and "data:image/png;base64," in meta["defocus"].value
    )
    report = data / "cryo" / "live" / KEY / "report" / "report.html"
    assert (
        meta["report"].value == str(report) and report.is_file() and (report.parent / "report.pdf").is_file()
    )
    project = data / "cryo" / "live" / KEY / "relion"
    ctf = starfile.read(project / "CtfFind" / "job003" / "micrographs_ctf.star")
    assert len(ctf["micrographs"]) == 3 and (project / "default_pipeline.star").is_file()
    json.loads(json.dumps({k: str(v.value) for k, v in meta.items()}))  # every value shows in the UI
