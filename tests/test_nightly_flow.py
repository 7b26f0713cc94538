"""The nightly flow end to end on real services: Prefect, Ray, the S3 server, ffmpeg, tiny Wan2.2 models."""

from __future__ import annotations

import io
import json
import re
import urllib.request
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalogs.sample import SAMPLE_DIR, SAMPLE_PRODUCTS
from catalogs.schema import CATALOG_SCHEMA, CatalogSchemaError
from flows.nightly import nightly_catalog
from tasks.postprod.motion import conform_frame_count
from tasks.postprod.verify import verify_clip
from tasks.postproduction import trust_anchor
from tasks.records import ClipStatus
from tests.cli_process import run_wanfactory
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
        # The standard profile: tiny 96x64 frames delivered at 384x256, conformed to 24 fps.
        assert (entry.delivered_width, entry.delivered_height) == (entry.width * 4, entry.height * 4)
        assert entry.delivered_fps == 24
        assert entry.delivered_frames == conform_frame_count(entry.num_frames, entry.fps, 24)
        assert (info.width, info.height, info.frames, info.fps) == (
            entry.delivered_width,
            entry.delivered_height,
            entry.delivered_frames,
            entry.delivered_fps,
        )
        assert top_level_boxes(path).index("moov") < top_level_boxes(path).index("mdat")
        frames = decode_frames(path)
        assert frames.std() > 1
        assert store.get_bytes(entry.thumbnail_key)[:3] == b"\xff\xd8\xff"  # a JPEG
        with Image.open(io.BytesIO(store.get_bytes(entry.preview_key))) as preview:
            assert preview.format == "WEBP" and preview.n_frames > 1


def test_every_stage_ran_and_the_published_clips_verify(sample_run, store, settings, tmp_path):
    for entry in sample_run.entries:
        stages = {report["stage"]: report for report in entry.postprocess}
        assert list(stages) == [
            "content_filter",
            "delivery",
            "stabilize",
            "conform",
            "visible_watermark",
            "invisible_watermark",
            "encode",
            "provenance",
            "preview",
        ]
        assert stages["content_filter"]["outcome"]["allowed"] and entry.filter_scores
        for name in ("delivery", "conform", "visible_watermark", "invisible_watermark", "provenance"):
            assert stages[name]["applied"], (name, stages[name])
        assert all(report["cpu_seconds"] >= 0 for report in entry.postprocess)
        path = tmp_path / f"{entry.clip_id}.mp4"
        path.write_bytes(store.get_bytes(entry.clip_key))
        report = verify_clip(path, trust_anchor(settings))
        assert report.ok, report.describe()
        assert report.watermark.payload_hex == entry.watermark_payload
        assert report.provenance.clip_id == entry.clip_id and report.provenance.run_id == sample_run.run_id


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
            "frames": str(entry.delivered_frames),
            "fps": str(entry.delivered_fps),
            "profile": "standard",
            "watermark": entry.watermark_payload,
        }
    table = pq.read_table(io.BytesIO(store.get_bytes(sample_run.manifest.parquet_key)))
    document = json.loads(store.get_bytes(sample_run.manifest.json_key))
    assert table.num_rows == len(document["clips"]) == len(SAMPLE_PRODUCTS)
    assert document["counts"] == {"published": len(SAMPLE_PRODUCTS)} == sample_run.manifest.counts
    for record, from_json in zip(table.to_pylist(), document["clips"], strict=True):
        # Timestamps: typed in Parquet, ISO 8601 in JSON.
        started = record["generate_started_at"]
        assert started is not None and from_json["generate_started_at"] == started.isoformat()
        assert {**record, "generate_started_at": started.isoformat()} == from_json
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
    # The summary a person opens: the cost line, the night's new clips on a contact sheet and each one's
    # animated preview, every link presigned, and when they expire.
    summary = artifacts["run-summary"].data
    lines = summary.splitlines()
    count = len(SAMPLE_PRODUCTS)
    assert any(line.startswith(f"Cost: $0.00 for {count} published clips ($0.00 a clip), ") for line in lines)
    assert " GPU-hours on cpu, " in summary and "Links expire after 24 h, at " in summary
    assert f"| **all** |  | {count} | " in summary  # the cost table's totals row
    (sheet,) = re.findall(r"!\[contact sheet of the new clips\]\((http[^)]+)\)", summary)
    assert f"/runs/{sample_run.run_id}/contact-sheet.jpg?" in sheet and "X-Amz-Signature=" in sheet
    with urllib.request.urlopen(sheet, timeout=30) as answer, Image.open(io.BytesIO(answer.read())) as image:
        assert image.format == "JPEG" and image.width > 1000, (image.format, image.size)
    previews = re.findall(r"!\[[^]]*\]\((http[^)]+\.webp\?[^)]+)\)", summary)
    assert len(previews) == count and all("X-Amz-Signature=" in link for link in previews)
    assert "## Failures by reason" not in summary  # none failed


def test_each_clip_records_the_gpu_time_it_held_its_type_and_cost(sample_run, store):
    for entry in sample_run.entries:
        # Measured on the actor: at least the engine's render, which it includes.
        assert entry.gpu_seconds is not None and entry.gpu_seconds >= entry.generate_seconds > 0, entry
        assert (entry.gpu_type, entry.cost_usd) == ("cpu", 0.0), entry
    document = json.loads(store.get_bytes(sample_run.manifest.json_key))
    by_clip = {clip["clip_id"]: clip for clip in document["clips"]}
    for entry in sample_run.entries:
        clip = by_clip[entry.clip_id]
        assert (clip["gpu_seconds"], clip["gpu_type"], clip["cost_usd"]) == (entry.gpu_seconds, "cpu", 0.0)


def test_a_rerun_skips_everything_and_force_regenerates_the_same_clips(sample_run, store, tmp_path):
    catalog = store.uri("catalogs/sample/catalog.parquet")
    before = {e.clip_key: store.get_bytes(e.clip_key) for e in sample_run.entries}
    rerun = nightly_catalog(catalog_uri=catalog)
    assert {e.status for e in rerun.entries} == {ClipStatus.SKIPPED}
    assert {e.clip_id for e in rerun.entries} == {e.clip_id for e in sample_run.entries}
    forced = nightly_catalog(catalog_uri=catalog, force=True)
    assert {e.status for e in forced.entries} == {ClipStatus.PUBLISHED}
    # Same seeds, same frames: the clips differ only by the invisible watermark, which names the run.
    for entry in forced.entries:
        old, new = tmp_path / "old.mp4", tmp_path / "new.mp4"
        old.write_bytes(before[entry.clip_key])
        new.write_bytes(store.get_bytes(entry.clip_key))
        difference = decode_frames(old).astype(float) - decode_frames(new).astype(float)
        psnr = 10 * np.log10(255**2 / max(np.mean(difference**2), 1e-9))
        # Each mark costs ~39 dB against unmarked frames, two different marks on the tiny models'
        # upscaled noise-like frames 32-35 dB against each other; clips of another seed are ~10 dB apart.
        assert psnr > 28, (entry.sku, psnr)
    payloads = {e.clip_id: e.watermark_payload for e in sample_run.entries}
    assert all(payloads[e.clip_id] != e.watermark_payload for e in forced.entries)


def test_bad_rows_are_reported_and_good_rows_still_publish(store):
    store.put_bytes(
        "catalogs/bad/images/ok.png", (SAMPLE_DIR / "images" / "mug.png").read_bytes(), "image/png"
    )
    now = datetime(2026, 11, 21, tzinfo=UTC)
    rows = [
        {"sku": "GOOD-TEXT", "title": "Canvas tote", "description": "Olive tote.", "style": "outdoor"},
        {
            "sku": "BLOCKED",
            "title": "Tote",
            "description": "d",
            "style": "studio",
            "prompt": "A tote bag on a table, a beheading in the background",
        },
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
    assert {by_row[0].status, by_row[6].status} == {ClipStatus.PUBLISHED}
    assert store.exists(by_row[0].clip_key) and store.exists(by_row[6].clip_key)
    assert by_row[6].model == "i2v-a14b-tiny"
    # The prompt policy refused row 1 before any GPU time: quarantined, nothing generated or stored.
    assert by_row[1].status == ClipStatus.QUARANTINED and by_row[1].stage == "prompt_policy"
    assert "rule en/violence" in by_row[1].reason and by_row[1].generate_seconds is None
    assert not list(store.list_keys(f"clips/{by_row[1].sku}/"))
    assert not list(store.list_keys(f"quarantine/clips/{by_row[1].sku}/"))
    expected = {
        2: ("validate", "field 'sku': is required"),
        3: ("plan", "field 'model': unknown model 'wan9-xl'"),
        4: ("plan", "field 'size': 1920x1080 is not one of t2v-a14b-tiny's sizes"),
        5: ("plan", f"field 'image_uri': no image found at {store.uri('catalogs/bad/images/gone.png')}"),
    }
    for row, (stage, reason) in expected.items():
        assert by_row[row].status == ClipStatus.FAILED and by_row[row].stage == stage
        assert reason in by_row[row].reason, by_row[row].reason
    manifest = json.loads(store.get_bytes(result.manifest.json_key))
    assert manifest["counts"] == {"failed": 4, "published": 2, "quarantined": 1}
    assert {clip["row"]: clip["reason"] for clip in manifest["clips"]}[3] == by_row[3].reason


def test_a_model_that_cannot_load_fails_its_clips_with_the_reason(sample_run, store, monkeypatch):
    monkeypatch.setenv("WANFACTORY_MODEL_ROOT", store.uri("models/missing"))
    state = nightly_catalog(
        catalog_uri=store.uri("catalogs/sample/catalog.parquet"), force=True, return_state=True
    )
    # Clips that fail for the infrastructure fail the run, which says how many and where.
    assert (
        state.is_failed() and f"{len(SAMPLE_PRODUCTS)} clips failed for the infrastructure" in state.message
    )
    assert f"({len(SAMPLE_PRODUCTS)} at load)" in state.message
    result = state.result(raise_on_failure=False)
    assert len(result.entries) == len(SAMPLE_PRODUCTS)
    for entry in result.entries:
        assert entry.status == ClipStatus.FAILED and entry.stage == "load", entry
        assert "no diffusers pipeline (model_index.json) under s3://" in entry.reason
    assert json.loads(store.get_bytes(result.manifest.json_key))["counts"] == {"failed": len(SAMPLE_PRODUCTS)}


def test_wanfactory_verify_reads_a_published_clip_and_refuses_a_modified_one(sample_run, store, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    entry = sample_run.entries[0]
    runner = CliRunner()
    published = runner.invoke(app, ["verify", store.uri(entry.clip_key), "--json"])
    assert published.exit_code == 0, published.output
    report = json.loads(published.output)
    # Later tests re-publish the sample clips: the object's metadata names the run that made it now.
    assert report["ok"] and report["watermark"]["payload_hex"] == store.metadata(entry.clip_key)["watermark"]
    assert report["provenance"]["validation_state"] == "Trusted", report["provenance"]
    tampered = tmp_path / "tampered.mp4"
    data = bytearray(store.get_bytes(entry.clip_key))
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    modified = runner.invoke(app, ["verify", str(tampered)])
    assert modified.exit_code == 1 and "NOT VERIFIED" in modified.output, modified.output


# "row N (sku 'X'), field 'F'": how both `catalog validate` and the manifest's reasons name a problem.
_PROBLEM = re.compile(r"row (\d+)(?: \(sku '[^']*'\))?, field '([^']+)'")


def test_catalog_validate_and_the_run_agree_row_for_row(store):
    """Every problem a run finds before the GPU, `wanfactory catalog validate` finds first."""
    from typer.testing import CliRunner

    from flows.cli import app

    mug = (SAMPLE_DIR / "images" / "mug.png").read_bytes()
    store.put_bytes("catalogs/every-problem/images/ok.png", mug, "image/png")
    store.put_bytes("catalogs/every-problem/images/broken.png", b"these bytes are no PNG", "image/png")
    good = {"title": "Tote", "description": "An olive tote.", "style": "outdoor"}
    rows = [
        # Longer than the tiny text encoder reads (64 tokens): made, and the manifest says how much it read.
        {**good, "sku": "GOOD", "prompt": "An olive canvas tote on a wooden bench, morning light. " * 12},
        {**good, "sku": "GOOD-IMAGE", "image_uri": "images/ok.png"},
        {**good, "sku": None},  # a cell's rule: required
        {**good, "sku": "BAD-STYLE", "style": "vaporwave"},
        {**good, "sku": "GOOD"},  # a duplicate
        {**good, "sku": "NAN-SEED", "seed": float("nan")},  # a cell pyarrow cannot cast to int64
        {**good, "sku": "BAD-MODEL", "model": "wan9-xl"},
        {**good, "sku": "BAD-SIZE", "size": "1920x1080"},
        {**good, "sku": "BAD-FRAMES", "num_frames": 10},
        {**good, "sku": "NO-STEPS", "steps": 0},
        {**good, "sku": "BAD-PROFILE", "postprocess_profile": "cinema"},
        {**good, "sku": "NO-IMAGE", "image_uri": "images/gone.png"},
        {**good, "sku": "BROKEN-IMAGE", "image_uri": "images/broken.png"},
        {**good, "sku": "IMAGE-ON-T2V", "model": "t2v-a14b", "image_uri": "images/ok.png"},
        {**good, "sku": "BLOCKED", "prompt": "A tote bag on a table, a beheading in the background"},
        # A locale adds its language's rules to the default's (en), never takes them away.
        {**good, "sku": "BLOCKED-FR", "prompt": "A tote bag, a beheading", "locale": "fr"},
        {**good, "sku": "NO-LOCALE", "locale": "zz"},
        # Hostile text reaches the run summary as text, not markup.
        {**good, "sku": "EVIL\n# Heading [link](http://evil.example) | x"},
        # A local path outside the catalog's folder and the configured roots is never read.
        {**good, "sku": "PASSWD", "image_uri": "/etc/passwd"},
    ]
    schema = pa.schema(
        [
            field.with_type(pa.float64()) if field.name == "seed" else field.with_nullable(True)
            for field in CATALOG_SCHEMA
        ]
    )
    now = datetime(2026, 11, 21, tzinfo=UTC)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{**r, "updated_at": now} for r in rows], schema=schema), buffer)
    uri = store.uri("catalogs/every-problem/catalog.parquet")
    store.put_bytes(
        "catalogs/every-problem/catalog.parquet", buffer.getvalue(), "application/vnd.apache.parquet"
    )

    checked = CliRunner().invoke(app, ["catalog", "validate", uri])
    assert checked.exit_code == 1, checked.output
    found_by_validate = {(int(row), field) for row, field in _PROBLEM.findall(checked.output)}

    result = nightly_catalog(catalog_uri=uri)
    by_row = {e.row: e for e in result.entries}
    assert sorted(by_row) == list(range(len(rows)))
    assert {row for row, e in by_row.items() if e.status == ClipStatus.PUBLISHED} == {0, 1}
    assert by_row[0].prompt_tokens > by_row[0].prompt_tokens_kept == 64  # cut, and recorded as cut
    assert by_row[1].prompt_tokens_kept == min(by_row[1].prompt_tokens, 64)
    found_by_run = {
        (int(row), field)
        for e in result.entries
        if e.status in (ClipStatus.FAILED, ClipStatus.QUARANTINED)
        for row, field in _PROBLEM.findall(e.reason)
    }
    assert found_by_validate == found_by_run
    # Every bad row is there, each with the field at fault.
    assert {row for row, _ in found_by_run} == set(range(2, len(rows)))
    assert {(5, "seed"), (9, "steps"), (10, "postprocess_profile"), (12, "image_uri"), (14, "prompt")} <= (
        found_by_run
    )
    assert "2 rows make clips, 17 rows do not" in checked.output
    assert {(15, "prompt"), (16, "locale"), (17, "sku"), (18, "image_uri")} <= found_by_run
    assert "/etc/passwd is outside the folders local images are read from" in by_row[18].reason
    assert "rule en/violence" in by_row[15].reason and by_row[15].status == ClipStatus.QUARANTINED
    # Readers never get a refused prompt: the manifest they can read leaves it out, reviewers' has it.
    published = {c["row"]: c for c in json.loads(store.get_bytes(result.manifest.json_key))["clips"]}
    review_key = f"{result.manifest.review_prefix}/manifest.json"
    assert review_key.startswith("quarantine/")
    reviewed = {c["row"]: c for c in json.loads(store.get_bytes(review_key))["clips"]}
    assert published[14]["prompt"] is None and published[14]["prompt_sha256"] == reviewed[14]["prompt_sha256"]
    assert "beheading" in reviewed[14]["prompt"] and published[0]["prompt"] == reviewed[0]["prompt"]
    summary = flow_run_artifacts(result.flow_run_id)["run-summary"].data
    assert not any(line.startswith("# Heading") for line in summary.splitlines())
    assert "[link](http" not in summary and "\\[link\\]" in summary
    failed_rows = summary.split("## Failed and quarantined", 1)[1].splitlines()
    table = [line for line in failed_rows if line.startswith("| ") and "---" not in line]
    # Header + one row per failed or quarantined row, each of five cells: no stray '|' split one.
    assert len(table) == 1 + 17 and all(len(re.findall(r"(?<!\\)\|", line)) == 6 for line in table)
    # Grouped by reason too: e.g. the rows whose (first) problem is their image, one line with their count and
    # the first of them as an example.
    image_rows = [
        row
        for row, e in sorted(by_row.items())
        if e.stage == "plan" and e.reason.startswith(f"row {row} (sku {e.sku!r}), field 'image_uri': ")
    ]
    assert len(image_rows) >= 3 and {11, 12, 18} <= set(image_rows), image_rows
    kind = r"\| failed \| plan \| field 'image\\_uri' \|"
    group = rf"^{kind} {len(image_rows)} \| row {image_rows[0]} \S+: field 'image\\_uri': "
    assert re.search(group, summary, re.MULTILINE), summary


def test_a_file_that_is_not_parquet_fails_once_in_one_line(store, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    not_parquet = tmp_path / "catalog.parquet"
    not_parquet.write_text("sku,title,description\nA,Mug,A mug.\n")  # a CSV under a Parquet name
    validate = run_wanfactory("catalog", "validate", str(not_parquet))
    assert validate.returncode == 2, validate.stdout + validate.stderr
    assert validate.stderr.startswith("error: ") and validate.stderr.count("\n") == 1, validate.stderr
    assert f"{not_parquet} is not a Parquet file" in validate.stderr

    store.put_bytes("catalogs/csv/catalog.parquet", not_parquet.read_bytes(), "application/octet-stream")
    with pytest.raises(CatalogSchemaError, match="is not a Parquet file"):
        nightly_catalog(catalog_uri=store.uri("catalogs/csv/catalog.parquet"))
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    (load,) = [task for task in tasks if task.name.startswith("load_catalog_task")]
    assert load.run_count == 1  # failed once: the same file fails the same way again, so no retry
