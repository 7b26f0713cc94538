"""Who may read what in the bucket: the reader credential sees the published outputs, never the quarantine.

The pipeline writes with its own (writer) credential. People, the website and reports use a second, read-only
credential, the *reader*. A clip the content filter blocks goes under :data:`QUARANTINE_PREFIX`, which the
reader can neither read nor list. The same statements serve two servers:

- Ceph RGW (the local stack, tests) and AWS S3 enforce a **bucket policy** naming the reader as principal:
  :func:`reader_bucket_policy`, applied by :func:`apply_reader_access`.
- MinIO (production) takes bucket policies for anonymous access only; users get **IAM policies**, attached
  with ``mc admin policy``: :func:`reader_iam_policy`, stored as ``infra/minio/reader-policy.json``
  (``python -m infra.access [BUCKET]`` prints it; infra/DEPLOY.md has the mc commands).

What S3 policy can and cannot do for a listing: it never filters a listing's results, it only allows or
refuses the request, judged on its parameters (``s3:prefix``, ``s3:delimiter``). So the design is an
allow-list plus explicit denials:

- Allow listing only when the prefix lies under a published prefix (``clips/…``, ``experiments/…``,
  ``runs/…``), and reading only objects under them. Listing the bucket root is refused: even a listing
  delimited by ``/`` would name ``quarantine/`` among its common prefixes, and so tell whether anything is
  quarantined. A reader lists ``clips/`` (recursively or not), never the whole bucket.
- Deny, whatever else may grant the reader (an ACL, a broader policy attached by mistake, e.g. MinIO's
  ``readonly``): every action on ``quarantine/*``; every listing whose prefix could reach quarantine keys,
  i.e. a leading part of ``quarantine/`` (``q`` … ``quarantine``) or anything under it; and a listing of the
  whole bucket unless delimited by exactly ``/``, since a delimiter such as ``.mp4`` returns whole keys as
  common prefixes. Listings of versions and of multipart uploads (which show the keys of uploads in
  progress) are denied on the same terms.

Two server differences are covered by the conditions. Ceph leaves ``s3:prefix`` unset for an empty prefix,
MinIO sets it to ``""``: ``ForAllValues:StringEquals [""]`` matches both. MinIO fills condition keys from the
raw query, so a repeated ``prefix`` parameter yields several values while the listing uses the first:
``ForAllValues:`` makes every value qualify for the Allow, and a Deny matches if any value does.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from minio import Minio
from minio.error import S3Error

log = logging.getLogger(__name__)

QUARANTINE_PREFIX = "quarantine/"
PUBLISHED_PREFIXES = ("clips/", "experiments/", "runs/")
READER_UID = "wanfactory-reader"  # the reader's Ceph user in the local stack
MINIO_POLICY_FILE = Path(__file__).parent / "minio" / "reader-policy.json"
POLICY_VERSION = "2012-10-17"
# apply_reader_access owns the statements whose Sid starts with this and leaves any others alone.
SID_PREFIX = "WanfactoryReader"
_LIST_ACTIONS = ["s3:ListBucket", "s3:ListBucketVersions", "s3:ListBucketMultipartUploads"]
# Every way to change the bucket or its objects: the reader is read-only whatever else grants it.
_WRITE_ACTIONS = [
    "s3:PutObject",
    "s3:PutObjectAcl",
    "s3:PutObjectTagging",
    "s3:PutObjectRetention",
    "s3:PutObjectLegalHold",
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:DeleteObjectTagging",
    "s3:AbortMultipartUpload",
    "s3:RestoreObject",
    "s3:DeleteBucket",
    "s3:PutBucketPolicy",
    "s3:DeleteBucketPolicy",
    "s3:PutBucketAcl",
    "s3:PutBucketVersioning",
    "s3:PutBucketTagging",
    "s3:PutBucketCORS",
    "s3:PutBucketNotification",
    "s3:PutLifecycleConfiguration",
    "s3:PutReplicationConfiguration",
    "s3:PutBucketObjectLockConfiguration",
]

Statement = dict[str, Any]


def _reader_statements(bucket: str) -> list[Statement]:
    bucket_arn = f"arn:aws:s3:::{bucket}"
    published = [f"{prefix}*" for prefix in PUBLISHED_PREFIXES]
    # A listing prefix reaches quarantine keys if it is a leading part of the quarantine prefix or lies
    # under it: "q", "qu", ..., "quarantine", then "quarantine/*" (which covers "quarantine/" itself).
    reaching_quarantine = [QUARANTINE_PREFIX[:n] for n in range(1, len(QUARANTINE_PREFIX))]
    reaching_quarantine.append(f"{QUARANTINE_PREFIX}*")
    whole_bucket = {"ForAllValues:StringEquals": {"s3:prefix": [""]}}  # no prefix, or an empty one
    return [
        {
            # Clients (mc, minio-go) ask for the bucket's region before their first request.
            "Sid": f"{SID_PREFIX}BucketLocation",
            "Effect": "Allow",
            "Action": ["s3:GetBucketLocation"],
            "Resource": [bucket_arn],
        },
        {
            "Sid": f"{SID_PREFIX}ListPublished",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [bucket_arn],
            "Condition": {
                "StringLike": {"s3:prefix": published},  # a prefix is given (an absent key passes ForAll)
                "ForAllValues:StringLike": {"s3:prefix": published},
            },
        },
        {
            "Sid": f"{SID_PREFIX}ReadPublished",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [f"{bucket_arn}/{pattern}" for pattern in published],
        },
        {
            "Sid": f"{SID_PREFIX}DenyWrites",
            "Effect": "Deny",
            "Action": _WRITE_ACTIONS,
            "Resource": [bucket_arn, f"{bucket_arn}/*"],
        },
        {
            "Sid": f"{SID_PREFIX}DenyQuarantineObjects",
            "Effect": "Deny",
            "Action": ["s3:*"],
            "Resource": [f"{bucket_arn}/{QUARANTINE_PREFIX}*"],
        },
        {
            "Sid": f"{SID_PREFIX}DenyListQuarantine",
            "Effect": "Deny",
            "Action": _LIST_ACTIONS,
            "Resource": [bucket_arn],
            "Condition": {"StringLike": {"s3:prefix": reaching_quarantine}},
        },
        {
            "Sid": f"{SID_PREFIX}DenyListWholeBucketUndelimited",
            "Effect": "Deny",
            "Action": _LIST_ACTIONS,
            "Resource": [bucket_arn],
            "Condition": {**whole_bucket, "Null": {"s3:delimiter": "true"}},
        },
        {
            "Sid": f"{SID_PREFIX}DenyListWholeBucketOtherDelimiter",
            "Effect": "Deny",
            "Action": _LIST_ACTIONS,
            "Resource": [bucket_arn],
            "Condition": {**whole_bucket, "StringNotEquals": {"s3:delimiter": "/"}},
        },
    ]


def reader_iam_policy(bucket: str) -> dict[str, Any]:
    """The reader's access as an identity (IAM) policy: what MinIO attaches to a user.

    An identity policy can also refuse the reader buckets of its own (Ceph does that with the user's
    max-buckets instead: a bucket policy cannot).
    """
    no_buckets = {
        "Sid": f"{SID_PREFIX}DenyCreateBucket",
        "Effect": "Deny",
        "Action": ["s3:CreateBucket"],
        "Resource": ["arn:aws:s3:::*"],
    }
    return {"Version": POLICY_VERSION, "Statement": [*_reader_statements(bucket), no_buckets]}


def reader_bucket_policy(bucket: str, reader_user_arn: str) -> dict[str, Any]:
    """The reader's access as a bucket policy (Ceph RGW, AWS S3), every statement naming the reader."""
    principal = {"AWS": [reader_user_arn]}
    statements = [{**statement, "Principal": principal} for statement in _reader_statements(bucket)]
    return {"Version": POLICY_VERSION, "Statement": statements}


def ceph_user_arn(uid: str, tenant: str = "") -> str:
    """The principal ARN of a Ceph RGW user (RGW puts the tenant where AWS puts the account id)."""
    return f"arn:aws:iam::{tenant}:user/{uid}"


def apply_reader_access(client: Minio, bucket: str, reader_uid: str) -> bool:
    """Set the reader's statements in ``bucket``'s policy (Ceph RGW); True if the policy changed.

    ``client`` must be allowed to set the policy (the bucket owner, i.e. the writer). Statements of the
    policy that are not the reader's are kept; the reader's are replaced, so this is idempotent.
    """
    desired = reader_bucket_policy(bucket, ceph_user_arn(reader_uid))
    try:
        current = json.loads(client.get_bucket_policy(bucket))
    except S3Error as err:
        if err.code != "NoSuchBucketPolicy":
            raise
        current = {}
    statements = current.get("Statement", [])
    if isinstance(statements, dict):  # the policy grammar allows a single statement object
        statements = [statements]
    others = [s for s in statements if not str(s.get("Sid", "")).startswith(SID_PREFIX)]
    merged = {**desired, "Statement": others + desired["Statement"]}
    if merged == current:
        return False
    client.set_bucket_policy(bucket, json.dumps(merged))
    log.info(
        "reader access applied bucket=%s reader_uid=%s quarantine_prefix=%s other_statements=%d",
        bucket,
        reader_uid,
        QUARANTINE_PREFIX,
        len(others),
    )
    return True


if __name__ == "__main__":
    # Regenerates the MinIO policy: python -m infra.access [BUCKET] > infra/minio/reader-policy.json
    print(json.dumps(reader_iam_policy(sys.argv[1] if len(sys.argv) > 1 else "wanfactory"), indent=2))
