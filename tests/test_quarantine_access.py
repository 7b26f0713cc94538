"""A quarantined clip stays out of the reader's sight, on a real S3 server (the session's Ceph RGW).

The reader credential (people, the website, reports) reads and lists the published outputs but can neither
read nor list anything under quarantine/, not even through a listing of the whole bucket; the pipeline's
writer credential still can. The bucket policy Ceph enforces here has exactly the statements of the MinIO
IAM policy file (plus the principal), which is checked too.
"""

from __future__ import annotations

import fnmatch
import io
import itertools
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from minio import Minio
from minio.commonconfig import ENABLED, CopySource, Tags
from minio.credentials import Credentials
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.signer import presign_v4
from minio.versioningconfig import VersioningConfig

from infra.access import (
    MINIO_POLICY_FILE,
    PUBLISHED_PREFIXES,
    QUARANTINE_PREFIX,
    READER_UID,
    SID_PREFIX,
    apply_reader_access,
    ceph_user_arn,
    reader_bucket_policy,
    reader_iam_policy,
)
from infra.object_store_server import S3_UID, CephObjectStore, ObjectStoreError
from infra.objectstore import ObjectStore
from infra.settings import ObjectStoreConfig, Settings
from infra.stack import ensure_reader

BUCKET = "wanfactory-quarantine-test"  # its own bucket: other tests count what lies under clips/
CLIP = "clips/sku-1/clip-1.mp4"
MANIFEST = "runs/run-1/manifest.json"
QUARANTINED = f"{QUARANTINE_PREFIX}clips/sku-2/clip-2.mp4"
MODEL = "models/tiny/config.json"  # neither published nor quarantined: the reader has no use for it
OBJECTS = {CLIP: b"published clip", MANIFEST: b"{}", QUARANTINED: b"blocked clip", MODEL: b"{}"}

# What a broad grant would look like if someone gave the reader more by mistake (MinIO's `readonly`
# policy, an ACL): the Deny statements must keep quarantine/ hidden even then.
BROAD_GRANT = {
    "Sid": "BroadGrantByMistake",
    "Effect": "Allow",
    "Principal": {"AWS": [ceph_user_arn(READER_UID)]},
    "Action": ["s3:ListBucket", "s3:ListBucketVersions", "s3:ListBucketMultipartUploads", "s3:GetObject"],
    "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
}

# Listing requests, as raw query parameters, that could reveal quarantine keys; each kind of listing
# (v2, v1, versions, multipart uploads) is tried with each.
LIST_KINDS = ({"list-type": "2"}, {}, {"versions": ""}, {"uploads": ""})
QUARANTINE_PREFIXES = ("quarantine/", "quarantine/clips/", "quarantine", "quar", "q")
WHOLE_BUCKET = (
    {},  # no prefix: Ceph leaves s3:prefix unset
    {"prefix": ""},
    {"prefix": "", "delimiter": ""},
    {"prefix": "", "delimiter": ".mp4"},  # would return whole keys as common prefixes
    {"delimiter": "clip-2"},
)
REFUSED_LISTINGS = [
    {**kind, **params}
    for kind, params in itertools.product(
        LIST_KINDS, [*({"prefix": p} for p in QUARANTINE_PREFIXES), *WHOLE_BUCKET]
    )
]
ROOT_DELIMITED = [{"list-type": "2", "prefix": "", "delimiter": "/"}, {"delimiter": "/"}]


def _set_policy(writer: ObjectStore, policy: dict) -> None:
    writer.client.set_bucket_policy(BUCKET, json.dumps(policy))


def _reader_only_policy() -> dict:
    return reader_bucket_policy(BUCKET, ceph_user_arn(READER_UID))


@pytest.fixture(scope="module")
def writer(store: ObjectStore) -> ObjectStore:
    writer = ObjectStore(replace(store.config, bucket=BUCKET))
    writer.ensure_bucket()
    for key, body in OBJECTS.items():
        writer.put_bytes(key, body, "application/octet-stream")
    apply_reader_access(writer.client, BUCKET, READER_UID)
    return writer


@pytest.fixture(scope="module")
def reader(s3_server: CephObjectStore, settings: Settings, writer: ObjectStore) -> ObjectStore:
    config = replace(settings.reader_store(), bucket=BUCKET)
    ensure_reader(s3_server, config)  # as `wanfactory stack up` does
    return ObjectStore(config)


@pytest.fixture(params=["reader policy", "reader policy + a broad grant by mistake"])
def policy(request: pytest.FixtureRequest, writer: ObjectStore) -> Iterator[str]:
    if request.param != "reader policy":
        policy = _reader_only_policy()
        _set_policy(writer, {**policy, "Statement": [*policy["Statement"], BROAD_GRANT]})
    yield request.param
    _set_policy(writer, _reader_only_policy())


def _list(config: ObjectStoreConfig, params: dict[str, str]) -> list[str] | None:
    """Keys and common prefixes of a listing sent with exactly ``params``; None if it is refused.

    A presigned request, because the minio client always sends prefix and delimiter (empty if unset).
    """
    url = urllib.parse.urlsplit(f"http://{config.endpoint}/{config.bucket}?{urllib.parse.urlencode(params)}")
    signed = presign_v4(
        method="GET",
        url=url,
        region=config.region,
        credentials=Credentials(config.access_key, config.secret_key.get_secret_value()),
        date=datetime.now(UTC),
        expires=60,
    )
    try:
        with urllib.request.urlopen(urllib.parse.urlunsplit(signed), timeout=10) as response:
            root = ET.fromstring(response.read())
    except urllib.error.HTTPError as err:
        if err.code == 403 and b"<Code>AccessDenied</Code>" in err.read():
            return None
        raise
    # Keys of objects, versions or uploads, then the common prefixes (not the echoed request prefix).
    keys = [element.text for element in root.iterfind(".//{*}Key")]
    return keys + [element.text for element in root.iterfind("{*}CommonPrefixes/{*}Prefix")]


def _denied(call: Callable[[], object]) -> bool:
    try:
        call()
    except S3Error as err:
        assert err.code == "AccessDenied", err
        return True
    return False


def test_reader_reads_and_lists_published_outputs(reader: ObjectStore) -> None:
    assert reader.get_bytes(CLIP) == OBJECTS[CLIP]
    assert reader.get_bytes(MANIFEST) == OBJECTS[MANIFEST]
    assert list(reader.list_keys("clips/")) == [CLIP]
    assert list(reader.list_keys("runs/")) == [MANIFEST]
    assert [o.object_name for o in reader.client.list_objects(BUCKET, prefix="clips/")] == ["clips/sku-1/"]
    # The website hands out presigned links made with the reader's credential.
    with urllib.request.urlopen(reader.presigned_url(CLIP, timedelta(minutes=5)), timeout=10) as response:
        assert response.read() == OBJECTS[CLIP]


def test_reader_cannot_write_nor_read_outside_published_outputs(reader: ObjectStore) -> None:
    assert _denied(lambda: reader.put_bytes("clips/sku-1/forged.mp4", b"x", "video/mp4"))
    assert _denied(lambda: reader.get_bytes(MODEL))
    assert _list(reader.config, {"list-type": "2", "prefix": "models/"}) is None


def test_reader_can_write_nothing_anywhere(reader: ObjectStore, writer: ObjectStore) -> None:
    """Every write verb, as the reader: refused, and nothing changed."""
    client = reader.client
    big = b"x" * (6 * 1024 * 1024)  # over the part size below: a multipart upload
    writes: dict[str, Callable[[], object]] = {
        "create a bucket of its own": lambda: client.make_bucket("reader-own-bucket"),
        "put a new object": lambda: reader.put_bytes("clips/sku-1/forged.mp4", b"x", "video/mp4"),
        "overwrite a published clip": lambda: reader.put_bytes(CLIP, b"forged", "video/mp4"),
        "put outside the published prefixes": lambda: reader.put_bytes("forged.txt", b"x", "text/plain"),
        "multipart upload": lambda: client.put_object(
            BUCKET, "clips/sku-1/big.mp4", io.BytesIO(big), -1, part_size=5 * 1024 * 1024
        ),
        "copy an object": lambda: client.copy_object(
            BUCKET, "clips/sku-1/copy.mp4", CopySource(BUCKET, CLIP)
        ),
        "delete an object": lambda: client.remove_object(BUCKET, CLIP),
        "tag an object": lambda: client.set_object_tags(BUCKET, CLIP, _tags()),
        "set the bucket policy": lambda: client.set_bucket_policy(BUCKET, json.dumps(_reader_only_policy())),
        "delete the bucket policy": lambda: client.delete_bucket_policy(BUCKET),
        "turn on versioning": lambda: client.set_bucket_versioning(BUCKET, VersioningConfig(ENABLED)),
        "delete the bucket": lambda: client.remove_bucket(BUCKET),
    }
    allowed = [what for what, write in writes.items() if not _denied(write)]
    assert allowed == []
    # Deleting many at once: refused whole (Ceph), or key by key (S3 answers per key).
    try:
        errors = list(client.remove_objects(BUCKET, [DeleteObject(CLIP), DeleteObject(MANIFEST)]))
    except S3Error as err:
        assert err.code == "AccessDenied", err
    else:
        assert sorted(e.code for e in errors) == ["AccessDenied", "AccessDenied"]
    assert writer.get_bytes(CLIP) == OBJECTS[CLIP] and writer.get_bytes(MANIFEST) == OBJECTS[MANIFEST]
    assert not writer.exists("clips/sku-1/forged.mp4") and not writer.client.bucket_exists(
        "reader-own-bucket"
    )


def _tags() -> Tags:
    tags = Tags.new_object_tags()
    tags["forged"] = "yes"
    return tags


def test_reader_can_neither_read_nor_list_quarantine(reader: ObjectStore, policy: str) -> None:
    assert _denied(lambda: reader.get_bytes(QUARANTINED))
    assert _denied(lambda: reader.exists(QUARANTINED))
    assert _denied(lambda: reader.metadata(QUARANTINED))
    with pytest.raises(urllib.error.HTTPError) as presigned:
        urllib.request.urlopen(reader.presigned_url(QUARANTINED, timedelta(minutes=5)), timeout=10)
    assert presigned.value.code == 403
    assert _denied(lambda: list(reader.list_keys(QUARANTINE_PREFIX)))
    assert _denied(lambda: list(reader.list_keys("")))  # the whole bucket, recursively

    allowed = [params for params in REFUSED_LISTINGS if _list(reader.config, params) is not None]
    assert allowed == []

    # Under the reader policy alone even the bucket root is unlisted; a broad grant lets the root through,
    # which names quarantine/ as a common prefix but nothing inside it.
    for params in ROOT_DELIMITED:
        names = _list(reader.config, params)
        if policy == "reader policy":
            assert names is None, params
        else:
            assert names is not None and QUARANTINE_PREFIX in names, params
            assert not any(n.startswith(QUARANTINE_PREFIX) and n != QUARANTINE_PREFIX for n in names), names


def test_writer_keeps_full_access(writer: ObjectStore, policy: str) -> None:
    assert writer.get_bytes(QUARANTINED) == OBJECTS[QUARANTINED]
    assert list(writer.list_keys(QUARANTINE_PREFIX)) == [QUARANTINED]
    assert sorted(writer.list_keys("")) == sorted(OBJECTS)
    assert QUARANTINE_PREFIX in _list(writer.config, {"list-type": "2", "prefix": "", "delimiter": "/"})


def test_apply_reader_access_is_idempotent_and_keeps_other_statements(writer: ObjectStore) -> None:
    other = {
        "Sid": "SomeoneElses",
        "Effect": "Allow",
        "Principal": {"AWS": [ceph_user_arn(S3_UID)]},
        "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{BUCKET}/{MODEL}"],
    }
    try:
        assert apply_reader_access(writer.client, BUCKET, READER_UID) is False
        _set_policy(writer, {"Version": "2012-10-17", "Statement": [other]})
        assert apply_reader_access(writer.client, BUCKET, READER_UID) is True
        stored = json.loads(writer.client.get_bucket_policy(BUCKET))
        assert stored["Statement"] == [other, *_reader_only_policy()["Statement"]]
        assert apply_reader_access(writer.client, BUCKET, READER_UID) is False
    finally:
        _set_policy(writer, _reader_only_policy())


def test_ensure_user_is_idempotent_and_rotates_keys(
    s3_server: CephObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    def client(access_key: str, secret_key: str) -> Minio:
        return Minio(s3_server.endpoint, access_key, secret_key, secure=False, region="us-east-1")

    uid, first, second = "rotation-test", "rotation-secret-one", "rotation-secret-two"
    caplog.set_level(logging.DEBUG)
    s3_server.ensure_user(uid, "rotation-key", first, "rotation test")
    s3_server.ensure_user(uid, "rotation-key", first, "rotation test")
    client("rotation-key", first).list_buckets()

    s3_server.ensure_user(uid, "rotation-key", second, "rotation test")
    client("rotation-key", second).list_buckets()
    with pytest.raises(S3Error) as old_secret:
        client("rotation-key", first).list_buckets()
    assert old_secret.value.code == "SignatureDoesNotMatch"

    s3_server.ensure_user(uid, "rotation-key-2", second, "rotation test")
    client("rotation-key-2", second).list_buckets()
    with pytest.raises(S3Error) as old_key:
        client("rotation-key", second).list_buckets()
    assert old_key.value.code == "InvalidAccessKeyId"

    # An access key belongs to one user only: the error names the command, with the secret masked.
    with pytest.raises(ObjectStoreError) as taken:
        s3_server.ensure_user("someone-else", "rotation-key-2", "a-third-secret", "someone else")
    assert "--secret-key=***" in str(taken.value) and "a-third-secret" not in str(taken.value)
    assert not any(secret in caplog.text for secret in (first, second, "a-third-secret"))


def test_minio_policy_file_is_the_reader_policy() -> None:
    policy = json.loads(MINIO_POLICY_FILE.read_text())
    assert policy == reader_iam_policy("wanfactory"), "regenerate: python -m infra.access > " + str(
        MINIO_POLICY_FILE
    )
    # What Ceph enforced in the tests above is this policy with the reader as principal, less the denial
    # of buckets of its own, which Ceph enforces with the user's max-buckets (a bucket policy cannot).
    ceph = reader_bucket_policy("wanfactory", ceph_user_arn(READER_UID))
    *shared, no_buckets = policy["Statement"]
    assert [{k: v for k, v in s.items() if k != "Principal"} for s in ceph["Statement"]] == shared
    assert no_buckets["Action"] == ["s3:CreateBucket"] and no_buckets["Effect"] == "Deny"

    statements = policy["Statement"]
    assert all("Principal" not in s and s["Sid"].startswith(SID_PREFIX) for s in statements)
    denies = [s for s in statements if s["Effect"] == "Deny"]
    assert any(
        s["Action"] == ["s3:*"] and s["Resource"] == ["arn:aws:s3:::wanfactory/quarantine/*"] for s in denies
    )
    list_deny = next(s for s in denies if "s3:ListBucket" in s["Action"] and "StringLike" in s["Condition"])
    assert {"quarantine/*", "quarantine", "q"} <= set(list_deny["Condition"]["StringLike"]["s3:prefix"])
    # No Allow reaches a quarantined object, and listing is allowed only under the published prefixes.
    quarantined_arn = f"arn:aws:s3:::wanfactory/{QUARANTINED}"
    allows = [s for s in statements if s["Effect"] == "Allow"]
    assert not any(fnmatch.fnmatchcase(quarantined_arn, r) for s in allows for r in s["Resource"])
    list_allow = next(s for s in allows if s["Action"] == ["s3:ListBucket"])
    published = [f"{prefix}*" for prefix in PUBLISHED_PREFIXES]
    assert list_allow["Condition"] == {
        "StringLike": {"s3:prefix": published},
        "ForAllValues:StringLike": {"s3:prefix": published},
    }
    # MinIO's parser knows no *IfExists string operators: keep to those it accepts.
    operators = {op.rpartition(":")[2] for s in statements for op in s.get("Condition", {})}
    assert operators <= {"StringEquals", "StringNotEquals", "StringLike", "StringNotLike", "Null"}
    json.dumps(policy)  # and it is plain JSON, as mc admin policy create reads it
