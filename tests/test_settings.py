"""Deployment settings: embedded defaults for local, clear errors for missing or malformed ones."""

from __future__ import annotations

import pytest

from em_platform.settings import ConfigError, load_settings


def test_local_defaults_put_everything_under_the_data_root(tmp_path):
    s = load_settings({"EM_DATA_ROOT": str(tmp_path)})
    assert s.deployment == "local"
    assert s.inbox == str(tmp_path / "inbox")
    assert s.catalog_url == f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    assert s.dask_scheduler_address is None and s.inbox_settle_seconds == 5.0


def test_s3_root_needs_a_catalog_url_and_passes_the_endpoint():
    with pytest.raises(ConfigError, match="EM_CATALOG_URL"):
        load_settings({"EM_DATA_ROOT": "s3://bucket/em", "EM_INBOX": "/tmp/inbox"})
    s = load_settings(
        {
            "EM_DATA_ROOT": "s3://bucket/em",
            "EM_INBOX": "/tmp/inbox",
            "EM_CATALOG_URL": "postgresql://db/em",
            "EM_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        }
    )
    assert s.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}


@pytest.mark.parametrize(
    "env,names",
    [
        ({"EM_DEPLOYMENT": "cloud"}, "EM_DEPLOYMENT"),
        ({"EM_DEPLOYMENT": "docker"}, "EM_DATA_ROOT"),
        (
            {
                "EM_DEPLOYMENT": "docker",
                "EM_DATA_ROOT": "/data",
                "EM_CATALOG_URL": "sqlite:///x.db",
                "DASK_SCHEDULER_ADDRESS": "tcp://d:8786",
            },
            "PostgreSQL",
        ),
        (
            {"EM_DEPLOYMENT": "docker", "EM_DATA_ROOT": "/data", "EM_CATALOG_URL": "postgresql://db/em"},
            "DASK_SCHEDULER_ADDRESS",
        ),
        ({"EM_INBOX_SETTLE_SECONDS": "soon"}, "EM_INBOX_SETTLE_SECONDS"),
        ({"EM_INBOX_SETTLE_SECONDS": "-1"}, "EM_INBOX_SETTLE_SECONDS"),
        ({"EM_SCOPE_PIXEL_SIZE_NM": "4nm"}, "EM_SCOPE_PIXEL_SIZE_NM"),
        ({"EM_SCOPE_PIXEL_SIZE_NM": "0"}, "EM_SCOPE_PIXEL_SIZE_NM"),
    ],
)
def test_bad_config_names_the_variable(env, names, tmp_path):
    env = (
        {"EM_DATA_ROOT": str(tmp_path), **env}
        if "EM_DATA_ROOT" not in env and env.get("EM_DEPLOYMENT") != "docker"
        else env
    )
    with pytest.raises(ConfigError, match=names):
        load_settings(env)


def test_docker_deployment_with_everything_set():
    s = load_settings(
        {
            "EM_DEPLOYMENT": "docker",
            "EM_DATA_ROOT": "s3://em/data",
            "EM_INBOX": "/inbox",
            "EM_CATALOG_URL": "postgresql://db/em",
            "DASK_SCHEDULER_ADDRESS": "tcp://dask:8786",
        }
    )
    assert s.deployment == "docker" and s.dask_scheduler_address == "tcp://dask:8786"


def test_scope_pixel_size_reaches_the_hardware_resource(tmp_path):
    from em_platform.resources import build_resources

    simulated = build_resources(env={"EM_DATA_ROOT": str(tmp_path)})["hardware"]
    assert simulated.pixel_size_nm == 4.0  # the embedded simulator's default
    broker = build_resources(env={"EM_DATA_ROOT": str(tmp_path), "EM_BROKER": "127.0.0.1:61613"})["hardware"]
    assert broker.pixel_size_nm is None  # a real scope's pixel size is not guessed
    env = {"EM_DATA_ROOT": str(tmp_path), "EM_BROKER": "127.0.0.1:61613", "EM_SCOPE_PIXEL_SIZE_NM": "3.8"}
    assert build_resources(env=env)["hardware"].pixel_size_nm == 3.8


def test_acquisition_buffer_is_a_local_folder(tmp_path):
    from em_platform.resources import build_resources

    s = load_settings({"EM_DATA_ROOT": str(tmp_path / "d")})
    assert s.buffer == str(tmp_path / "d" / "buffer")
    remote = load_settings(
        {
            "EM_DATA_ROOT": "s3://bucket/em",
            "EM_CATALOG_URL": "sqlite:///x.db",
            "EM_INBOX": str(tmp_path / "in"),
        }
    )
    assert "://" not in remote.buffer and remote.buffer.endswith("buffer")
    chosen = load_settings({"EM_DATA_ROOT": str(tmp_path / "d"), "EM_BUFFER": str(tmp_path / "ssd")})
    assert build_resources(chosen)["storage"].buffer().root == str(tmp_path / "ssd")
    with pytest.raises(ConfigError, match="EM_BUFFER"):
        load_settings({"EM_DATA_ROOT": str(tmp_path / "d"), "EM_BUFFER": "s3://bucket/buffer"})


def test_download_cache_is_a_local_folder(tmp_path):
    from em_platform.resources import build_resources

    s = load_settings({"EM_DATA_ROOT": str(tmp_path / "d")})
    assert s.downloads == str(tmp_path / "d" / "downloads")
    chosen = load_settings({"EM_DATA_ROOT": str(tmp_path / "d"), "EM_DOWNLOADS": str(tmp_path / "dl")})
    assert build_resources(chosen)["storage"].downloads() == tmp_path / "dl"
    with pytest.raises(ConfigError, match="EM_DOWNLOADS"):
        load_settings({"EM_DATA_ROOT": str(tmp_path / "d"), "EM_DOWNLOADS": "s3://bucket/dl"})
