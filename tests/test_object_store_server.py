"""The local stack's object store is a real S3 server: it checks keys, keeps metadata across a restart and
serves presigned URLs. Needs Ceph (apt-get install radosgw ceph-mon ceph-osd); ~25 s, mostly the first mkfs.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
from minio import Minio
from minio.error import S3Error

from infra.object_store_server import CephObjectStore, ObjectStoreServerConfig
from infra.processes import free_ports

pytestmark = pytest.mark.services  # starts its own S3 server

ACCESS_KEY = "test-access"
SECRET_KEY = "test-secret-key"
BUCKET = "clips"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> CephObjectStore:
    s3_port, mon_port = free_ports(2)
    server = CephObjectStore(
        ObjectStoreServerConfig(
            data_dir=tmp_path_factory.mktemp("s3"),
            s3_port=s3_port,
            mon_port=mon_port,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
        )
    )
    request.addfinalizer(server.stop)
    server.start()
    return server


def _client(store: CephObjectStore, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Minio:
    return Minio(
        store.endpoint, access_key=access_key, secret_key=secret_key, secure=False, region="us-east-1"
    )


@pytest.fixture(scope="module")
def bucket(store: CephObjectStore) -> str:
    _client(store).make_bucket(BUCKET)
    return BUCKET


def test_wrong_keys_are_refused(store: CephObjectStore) -> None:
    with pytest.raises(S3Error) as wrong_secret:
        _client(store, secret_key="not-the-secret").list_buckets()
    assert wrong_secret.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as wrong_access:
        _client(store, access_key="nobody").list_buckets()
    assert wrong_access.value.code == "InvalidAccessKeyId"


def test_object_and_metadata_survive_a_restart(store: CephObjectStore, bucket: str) -> None:
    client = _client(store)
    body = b"not really an mp4" * 1000
    client.put_object(
        bucket,
        "run-1/clip-0.mp4",
        io.BytesIO(body),
        len(body),
        content_type="video/mp4",
        metadata={"clip-id": "0", "prompt": "a red fox"},
    )

    store.stop()
    assert not store.is_running()
    store.start()
    assert store.is_running()

    stat = client.stat_object(bucket, "run-1/clip-0.mp4")
    assert stat.content_type == "video/mp4"
    assert stat.metadata["x-amz-meta-clip-id"] == "0"
    assert stat.metadata["x-amz-meta-prompt"] == "a red fox"
    response = client.get_object(bucket, "run-1/clip-0.mp4")
    try:
        assert response.read() == body
    finally:
        response.close()
        response.release_conn()
    assert [b.name for b in client.list_buckets()] == [bucket]


def test_presigned_get_url(store: CephObjectStore, bucket: str) -> None:
    client = _client(store)
    client.put_object(bucket, "shared.txt", io.BytesIO(b"hello"), 5)
    url = client.presigned_get_object(bucket, "shared.txt", expires=timedelta(minutes=5))

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"hello"
    # The signature covers the key: the same URL for another object is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url.replace("shared.txt", "other.txt"), timeout=10)
    assert refused.value.code == 403
