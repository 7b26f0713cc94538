"""Finishing one generated clip on the real tools and the real S3 server: publish, quarantine, verify."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from minio.error import S3Error
from PIL import Image
from skimage import data

from catalogs.problems import RowRef
from infra.access import QUARANTINE_PREFIX, READER_UID, apply_reader_access
from infra.objectstore import ObjectStore
from infra.processes import wait_until
from infra.settings import Settings
from infra.stack import ensure_reader
from tasks.manifest import flush_spool, write_manifest
from tasks.postprod.profile import ProfileError
from tasks.postprod.verify import verify_clip
from tasks.postproduction import prepare_postproduction, trust_anchor
from tasks.publish import Finisher
from tasks.records import ClipSpec, ClipStatus, GeneratedClip, ManifestEntry
from wan_engine import GenerationRequest, get_model_spec, resolve_request

PROFILES = """
[strict]
description = "standard, but no faces at all"
[strict.delivery]
min_short_side = 256
[strict.content_filter]
blocked_labels = { FACE_FEMALE = 0.5, FACE_MALE = 0.5 }

[standard]
[standard.visible_watermark]
text = "AI-generated"
"""


def astronaut_clip(profile: str, frames: int = 9) -> GeneratedClip:
    """An innocuous real photo of a person (scikit-image's), slowly panned: what a model might return."""
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((420, 420)))
    video = np.stack([photo[20 : 20 + 256, 2 * t : 2 * t + 384] for t in range(frames)])
    model = get_model_spec("t2v-a14b", "tiny")
    # 384x256: the frames a delivery-sized clip would have; planning would refuse it for the tiny model.
    request = GenerationRequest(
        prompt="an astronaut portrait", seed=1, width=384, height=256, num_frames=frames
    )
    clip = ClipSpec(
        clip_id=f"astronaut-{profile}",
        origin=RowRef(source="catalog", row=0, sku="ASTRO-1"),
        model=model,
        request=resolve_request(model, request),
        profile=profile,
    )
    return GeneratedClip(
        clip=clip,
        frames=video,
        worker="test-worker",
        engine_mode="exact",
        seconds=1.5,
        expert_calls={"high_noise": 2, "low_noise": 2},
    )


@pytest.fixture(scope="module")
def postproduction(settings, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "profiles.toml"
    path.write_text(PROFILES)
    return prepare_postproduction(settings.model_copy(update={"postprocess_profiles_path": path}))


@pytest.fixture(scope="module")
def reader(s3_server, settings, store) -> ObjectStore:
    apply_reader_access(store.client, store.bucket, READER_UID)
    config = settings.reader_store()
    ensure_reader(s3_server, config)
    return ObjectStore(config)


def test_the_frame_gate_quarantines_where_readers_cannot_look(postproduction, store, reader):
    entry = Finisher(postproduction.finishing, "run-q").finish(astronaut_clip("strict"))
    assert entry.status == ClipStatus.QUARANTINED and entry.stage == "content_filter", entry
    assert "FACE_FEMALE scored" in entry.reason and entry.filter_scores["FACE_FEMALE"] >= 0.5
    assert (
        entry.clip_key is None
        and entry.quarantine_key == QUARANTINE_PREFIX + "clips/ASTRO-1/astronaut-strict.mp4"
    )
    # Nothing published; the writer (reviewers) can see the clip, a normal reader cannot.
    assert not store.exists("clips/ASTRO-1/astronaut-strict.mp4")
    assert store.exists(entry.quarantine_key)
    with pytest.raises(S3Error) as refused:
        reader.get_bytes(entry.quarantine_key)
    assert refused.value.code == "AccessDenied"
    with pytest.raises(S3Error):
        list(reader.list_keys(QUARANTINE_PREFIX))
    # The filter ran first and stopped the chain: no watermark, no signature for a blocked clip.
    assert [report["stage"] for report in entry.postprocess] == ["content_filter"]


def test_the_same_frames_pass_the_standard_profile_and_verify(
    postproduction, store, reader, settings, tmp_path
):
    entry = Finisher(postproduction.finishing, "run-p").finish(astronaut_clip("standard"))
    assert entry.status == ClipStatus.PUBLISHED, entry
    assert entry.filter_scores["FACE_FEMALE"] >= 0.5  # seen and scored, but not blocked by default
    assert (entry.delivered_width, entry.delivered_height, entry.delivered_fps, entry.delivered_frames) == (
        384,
        256,
        24,
        13,
    )
    path = tmp_path / "published.mp4"
    path.write_bytes(reader.get_bytes(entry.clip_key))  # readers get published clips
    report = verify_clip(path, trust_anchor(settings))
    assert report.ok and report.watermark.payload_hex == entry.watermark_payload, report.describe()
    # A modified file no longer validates.
    tampered = tmp_path / "tampered.mp4"
    data_bytes = bytearray(path.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data_bytes))
    assert not verify_clip(tampered, trust_anchor(settings)).ok


def test_a_finisher_loads_its_tools_once_and_serves_every_clip_with_them(postproduction):
    finisher = Finisher(postproduction.finishing, "run-t")
    tools = dict(finisher.tools)
    assert set(tools) == set(postproduction.profiles)
    assert len({id(t.classifier) for t in tools.values()}) == 1  # one classifier model for every profile
    for profile in ("strict", "strict"):
        assert finisher.finish(astronaut_clip(profile)).status == ClipStatus.QUARANTINED
    assert all(finisher.tools[name] is tools[name] for name in tools)


def test_a_profile_whose_logo_is_missing_stops_the_run_at_its_start(settings, tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text('[web.visible_watermark]\nlogo_uri = "s3://wanfactory-test/brand/missing.png"\n')
    with pytest.raises(
        ProfileError, match=r"profile 'web': cannot read logo 's3://wanfactory-test/brand/missing.png'"
    ):
        prepare_postproduction(
            settings.model_copy(update={"postprocess_profiles_path": path, "postprocess_profile": "web"})
        )


def test_a_profile_whose_label_font_is_missing_stops_the_run_at_its_start(settings, tmp_path):
    # As on a host without fonts-dejavu-core: every clip would otherwise fail at the visible watermark.
    path = tmp_path / "profiles.toml"
    path.write_text('[web.visible_watermark]\nfont_path = "/nowhere/NoSuchFont-Bold.ttf"\n')
    with pytest.raises(ProfileError, match=r"profile 'web': cannot load the label font '/nowhere/NoSuchFont"):
        prepare_postproduction(
            settings.model_copy(update={"postprocess_profiles_path": path, "postprocess_profile": "web"})
        )


def test_settings_name_an_unknown_default_profile(settings):
    with pytest.raises(ProfileError, match=r"WANFACTORY_POSTPROCESS_PROFILE='cinema' is not one of"):
        prepare_postproduction(Settings(postprocess_profile="cinema"))


def test_a_finished_clip_waits_out_an_outage_of_the_store(postproduction, store, s3_server, caplog):
    """The store goes away while a clip is finished: the clip's files wait and are published once it is back,
    with no second generation."""
    caplog.set_level(logging.WARNING, logger="tasks.publish")
    finisher = Finisher(replace(postproduction.finishing, upload_retry_seconds=300), "run-outage")
    s3_server.stop()
    try:
        with ThreadPoolExecutor(1) as pool:
            finishing = pool.submit(finisher.finish, astronaut_clip("standard"))
            waited = wait_until(
                lambda: any("upload failed, trying again" in r.getMessage() for r in caplog.records),
                timeout=180,
                interval=0.5,
            )
            assert waited, "the finisher never tried again"
            s3_server.start()
            entry = finishing.result(timeout=300)
    finally:
        if not s3_server.is_running():
            s3_server.start()
    assert entry.status == ClipStatus.PUBLISHED, entry
    assert store.exists(entry.clip_key) and entry.attempts == 1


def test_a_manifest_the_store_cannot_take_is_spooled_then_delivered(store, s3_server, tmp_path):
    entry = ManifestEntry(run_id="run-spool", row=0, sku="A", status=ClipStatus.FAILED, stage="upload")
    s3_server.stop()
    try:
        location = write_manifest(store, "run-spool", "s3://catalog", [entry], spool_dir=tmp_path)
    finally:
        s3_server.start()
    assert location.spooled and (tmp_path / store.bucket / location.json_key).is_file()
    assert not store.exists(location.json_key)
    assert sorted(flush_spool(store, tmp_path)) == sorted([location.json_key, location.parquet_key])
    assert json.loads(store.get_bytes(location.json_key))["clips"][0]["stage"] == "upload"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # delivered, and gone from the spool
