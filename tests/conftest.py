"""Real services for the tests: a Ceph RGW S3 server, a Prefect test server, a local Ray.

Each is started once per test session. The flow reads its settings from the
environment, as in production, so the session points ``WANFACTORY_*`` at them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from infra.object_store_server import CephObjectStore, ObjectStoreServerConfig
from infra.objectstore import ObjectStore
from infra.processes import free_ports
from infra.settings import Settings

TEST_BUCKET = "wanfactory-test"
# Fixtures that start a real service: a test that uses one (directly or through another fixture) is
# marked `services`, so `pytest -m "not services"` is the fast tier of pure logic.
SERVICE_FIXTURES = frozenset({"s3_server", "prefect_server", "ray_cluster", "scheduling_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[CephObjectStore]:
    s3_port, mon_port = free_ports(2)
    config = ObjectStoreServerConfig(
        data_dir=tmp_path_factory.mktemp("s3"),
        s3_port=s3_port,
        mon_port=mon_port,
        access_key="wanfactory-test",
        secret_key=secrets.token_urlsafe(24),
    )
    server = CephObjectStore(config)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(s3_server, tmp_path_factory) -> Iterator[Settings]:
    env = {
        "WANFACTORY_S3_ENDPOINT": s3_server.endpoint,
        "WANFACTORY_S3_ACCESS_KEY": s3_server.config.access_key,
        "WANFACTORY_S3_SECRET_KEY": s3_server.config.secret_key,
        "WANFACTORY_S3_BUCKET": TEST_BUCKET,
        "WANFACTORY_MODEL_ROOT": f"s3://{TEST_BUCKET}/models/tiny",
        "WANFACTORY_ADAPTER_ROOT": f"s3://{TEST_BUCKET}/adapters/tiny",
        "WANFACTORY_MODEL_VARIANT": "tiny",
        "WANFACTORY_MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")),
        "WANFACTORY_STATE_DIR": str(tmp_path_factory.mktemp("state")),
        "WANFACTORY_CPU_ACTORS_PER_MODEL": "1",
        "WANFACTORY_CLIPS_PER_TASK": "5",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield Settings()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def store(settings) -> ObjectStore:
    store = ObjectStore(settings.object_store())
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def tiny_models(settings, store) -> list[str]:
    """The tiny models, uploaded to the object store so actors load them from an S3 prefix, and tiny files
    for every registered adapter."""
    from flows.cli import ensure_tiny_adapters, ensure_tiny_models

    ensure_tiny_adapters(settings)
    return ensure_tiny_models(settings)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    # Its telemetry write races the tests' own database writes ("database is locked" noise).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_cluster(settings) -> Iterator[None]:
    import ray

    from tasks.fleet import connect_ray

    # Its Prometheus metrics on a port of its own (tests/test_metrics.py scrapes it).
    (metrics_port,) = free_ports(1)
    connect_ray(settings.model_copy(update={"ray_metrics_export_port": metrics_port}))
    yield
    ray.shutdown()
