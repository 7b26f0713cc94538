"""The nightly flow end to end on real services: Prefect, Ray, the S3 server, ffmpeg, tiny Wan2.2 models."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs.sample import SAMPLE_DIR, SAMPLE_PRODUCTS
from catalogs.schema import CATALOG_SCHEMA
from flows.nightly import nightly_catalog
from tasks.records import ClipStatus
from tests.media import decode_frames, probe_video, top_level_boxes

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")


def flow_run_artifacts(flow_run_id: str) -> dict[str, object]:
    """The artifacts the Prefect server holds for a flow run, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in artifacts}


@pytest.fixture(scope="module")
def sample_run(store, tmp_path_factory):
    store.upload_folder(SAMPLE_DIR, "catalogs/sample")
    return nightly_catalog(catalog_uri=store.uri("catalogs/sample/catalog.parquet"))


def test_every_sample_clip_is_published_as_a_playable_mp4(sample_run, store, tmp_path):
    entries = sample_run.entries
    assert len(entries) == len(SAMPLE_PRODUCTS)
    assert {e.status for e in entries} == {ClipStatus.PUBLISHED}, [(e.sku, e.reason) for e in entries]
    for entry in entries:
        path = tmp_path / f"{entry.clip_id}.mp4"
        path.write_bytes(store.get_bytes(entry.clip_key))
        info = probe_video(path)
        assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
        assert (info.width, info.height, info.frames, info.fps) == (
            entry.width,
            entry.height,
            entry.num_frames,
            entry.fps,
        )
        assert top_level_boxes(path).index("moov") < top_level_boxes(path).index("mdat")
        frames = decode_frames(path)
        assert frames.shape == (entry.num_frames, entry.height, entry.width, 3) and frames.std() > 1
        assert store.get_bytes(entry.thumbnail_key)[:3] == b"\xff\xd8\xff"  # a JPEG


def test_object_metadata_and_manifest_agree(sample_run, store):
    by_clip = {e.clip_id: e for e in sample_run.entries}
    for entry in sample_run.entries:
        metadata = store.metadata(entry.clip_key)
        assert metadata == {
            "clip-id": entry.clip_id,
            "sku": entry.sku,
            "model": entry.model,
            "seed": str(entry.seed),
            "prompt-sha256": entry.prompt_sha256,
            "run-id": sample_run.run_id,
            "frames": str(entry.num_frames),
            "fps": str(entry.fps),
        }
    table = pq.read_table(io.BytesIO(store.get_bytes(sample_run.manifest.parquet_key)))
    document = json.loads(store.get_bytes(sample_run.manifest.json_key))
    assert table.num_rows == len(document["clips"]) == len(SAMPLE_PRODUCTS)
    assert document["counts"] == {"published": len(SAMPLE_PRODUCTS)} == sample_run.manifest.counts
    for record, from_json in zip(table.to_pylist(), document["clips"], strict=True):
        assert record == from_json
        entry = by_clip[record["clip_id"]]
        assert (record["sku"], record["status"], record["clip_key"], record["seed"]) == (
            entry.sku,
            "published",
            entry.clip_key,
            entry.seed,
        )


def test_both_experts_ran_for_the_mixture_of_experts_models(sample_run):
    for entry in sample_run.entries:
        assert entry.engine_mode == "exact", entry  # the default; approximate modes are opt-in
        if entry.model.endswith("a14b-tiny"):
            assert entry.expert_calls["high_noise"] > 0 and entry.expert_calls["low_noise"] > 0, entry
        else:
            assert set(entry.expert_calls) == {"dense"}, entry
    assert {e.model for e in sample_run.entries} == {"t2v-a14b-tiny", "i2v-a14b-tiny", "ti2v-5b-tiny"}


def test_the_run_posts_its_artifacts(sample_run):
    artifacts = flow_run_artifacts(sample_run.flow_run_id)
    table = artifacts["clip-summary"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted(row["sku"] for row in rows) == sorted(p["sku"] for p in SAMPLE_PRODUCTS)
    assert all(row["status"] == "published" and row["clip"].startswith("http") for row in rows)
    assert artifacts["clip-progress"].data == 100.0
    assert "published" in artifacts["run-summary"].data


def test_a_rerun_skips_everything_and_force_regenerates_identical_clips(sample_run, store):
    catalog = store.uri("catalogs/sample/catalog.parquet")
    etags = {e.clip_key: store.client.stat_object(store.bucket, e.clip_key).etag for e in sample_run.entries}
    rerun = nightly_catalog(catalog_uri=catalog)
    assert {e.status for e in rerun.entries} == {ClipStatus.SKIPPED}
    assert {e.clip_id for e in rerun.entries} == {e.clip_id for e in sample_run.entries}
    forced = nightly_catalog(catalog_uri=catalog, force=True)
    assert {e.status for e in forced.entries} == {ClipStatus.PUBLISHED}
    # Same seeds, same frames, same encoder settings: byte-identical clips.
    assert {
        e.clip_key: store.client.stat_object(store.bucket, e.clip_key).etag for e in forced.entries
    } == etags


def test_bad_rows_are_reported_and_good_rows_still_publish(store):
    store.put_bytes(
        "catalogs/bad/images/ok.png", (SAMPLE_DIR / "images" / "mug.png").read_bytes(), "image/png"
    )
    now = datetime(2026, 11, 21, tzinfo=UTC)
    rows = [
        {"sku": "GOOD-TEXT", "title": "Canvas tote", "description": "Olive tote.", "style": "outdoor"},
        {"sku": None, "title": "No SKU", "description": "d", "style": "studio"},
        {"sku": "BAD-MODEL", "title": "t", "description": "d", "style": "studio", "model": "wan9-xl"},
        {"sku": "BAD-SIZE", "title": "t", "description": "d", "style": "studio", "size": "1920x1080"},
        {
            "sku": "NO-IMAGE",
            "title": "t",
            "description": "d",
            "style": "studio",
            "image_uri": "images/gone.png",
        },
        {
            "sku": "GOOD-IMAGE",
            "title": "Mug",
            "description": "Blue mug.",
            "style": "studio",
            "image_uri": "images/ok.png",
        },
    ]
    # Written as other tools would: nothing stops a null SKU from reaching the file.
    nullable = pa.schema([field.with_nullable(True) for field in CATALOG_SCHEMA])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{**r, "updated_at": now} for r in rows], schema=nullable), buffer)
    store.put_bytes("catalogs/bad/catalog.parquet", buffer.getvalue(), "application/vnd.apache.parquet")

    result = nightly_catalog(catalog_uri=store.uri("catalogs/bad/catalog.parquet"))

    by_row = {e.row: e for e in result.entries}
    assert sorted(by_row) == list(range(len(rows)))
    assert {by_row[0].status, by_row[5].status} == {ClipStatus.PUBLISHED}
    assert store.exists(by_row[0].clip_key) and store.exists(by_row[5].clip_key)
    assert by_row[5].model == "i2v-a14b-tiny"
    expected = {
        1: ("validate", "field 'sku': is required"),
        2: ("plan", "field 'model': unknown model 'wan9-xl'"),
        3: ("plan", "field 'size': 1920x1080 is not one of t2v-a14b-tiny's sizes"),
        4: ("plan", f"field 'image_uri': no image found at {store.uri('catalogs/bad/images/gone.png')}"),
    }
    for row, (stage, reason) in expected.items():
        assert by_row[row].status == ClipStatus.FAILED and by_row[row].stage == stage
        assert reason in by_row[row].reason, by_row[row].reason
    manifest = json.loads(store.get_bytes(result.manifest.json_key))
    assert manifest["counts"] == {"failed": 4, "published": 2}
    assert {clip["row"]: clip["reason"] for clip in manifest["clips"]}[2] == by_row[2].reason


def test_a_model_that_cannot_load_fails_its_clips_with_the_reason(sample_run, store, monkeypatch):
    monkeypatch.setenv("WANFACTORY_MODEL_ROOT", store.uri("models/missing"))
    result = nightly_catalog(catalog_uri=store.uri("catalogs/sample/catalog.parquet"), force=True)
    assert len(result.entries) == len(SAMPLE_PRODUCTS)
    for entry in result.entries:
        assert entry.status == ClipStatus.FAILED and entry.stage == "load", entry
        assert "no diffusers pipeline (model_index.json) under s3://" in entry.reason
    assert json.loads(store.get_bytes(result.manifest.json_key))["counts"] == {"failed": len(SAMPLE_PRODUCTS)}
