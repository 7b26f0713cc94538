"""Catalog validation and clip planning: pure logic, no services."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs.prompts import STYLES, product_prompt
from catalogs.rules import ModelDefaults, product_seed
from catalogs.sample import SAMPLE_CATALOG, SAMPLE_PRODUCTS, synthetic_catalog
from catalogs.schema import CATALOG_SCHEMA, CatalogSchemaError, validate_catalog
from catalogs.sources import load_catalog, resolve_reference
from tasks.fleet import plan_fleets
from tasks.planning import ImageCheck, PlanningRules, hold_back, plan_clips
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import ProfileError, load_profiles, parse_profiles
from tasks.records import ClipStatus

PROFILES = load_profiles()
RULES = PlanningRules(
    models=ModelDefaults(variant="tiny", text_model="t2v-a14b", image_model="i2v-a14b"),
    profiles=PROFILES,
    default_profile="standard",
    prompt_policy=PromptPolicy.load(),
)
NOW = datetime(2026, 11, 21, tzinfo=UTC)


def catalog_table(rows: list[dict]) -> pa.Table:
    base = {"title": "Mug", "description": "A mug.", "style": "studio", "updated_at": NOW}
    return pa.Table.from_pylist([{**base, **row} for row in rows], schema=CATALOG_SCHEMA)


def digests_of(catalog) -> dict[str, ImageCheck]:
    return {
        row.image_uri: ImageCheck(sha256=hashlib.sha256(open(row.image_uri, "rb").read()).hexdigest())
        for row in catalog.rows
        if row.image_uri
    }


def test_sample_catalog_is_valid_and_plans_every_row():
    catalog = load_catalog(str(SAMPLE_CATALOG))
    assert not catalog.problems and len(catalog.rows) == len(SAMPLE_PRODUCTS) >= 10
    assert sum(1 for row in catalog.rows if row.image_uri) >= 3
    plan = plan_clips(catalog, RULES, "run-1", digests_of(catalog), published_keys=set())
    assert not plan.rejected and len(plan.clips) == len(catalog.rows)
    assert {clip.model.name for clip in plan.clips} == {"t2v-a14b-tiny", "i2v-a14b-tiny", "ti2v-5b-tiny"}


def test_validation_names_row_and_field_and_keeps_good_rows():
    table = catalog_table(
        [
            {"sku": "GOOD-1"},
            {"sku": None},
            {"sku": "BAD STYLE", "style": "vaporwave"},
            {"sku": "NEG-SEED", "seed": -1, "size": "wide"},
            {"sku": "GOOD-1"},
        ]
    )
    catalog = validate_catalog(table)
    assert [row.sku for row in catalog.rows] == ["GOOD-1"]
    messages = [str(problem) for problem in catalog.problems]
    assert "row 1, field 'sku': is required" in messages
    assert any(m.startswith("row 2 (sku 'BAD STYLE'), field 'sku'") for m in messages)
    assert any(
        m.startswith("row 2 (sku 'BAD STYLE'), field 'style': unknown style 'vaporwave'") for m in messages
    )
    assert any(m.startswith("row 3 (sku 'NEG-SEED'), field 'seed'") for m in messages)
    assert any(
        m.startswith("row 3 (sku 'NEG-SEED'), field 'size': 'wide' is not WIDTHxHEIGHT") for m in messages
    )
    assert "row 4 (sku 'GOOD-1'), field 'sku': duplicates row 0" in messages


def test_a_missing_required_column_is_named():
    table = catalog_table([{"sku": "A"}]).drop_columns(["style"])
    with pytest.raises(CatalogSchemaError, match="style"):
        validate_catalog(table)


def test_naive_timestamps_and_missing_optional_columns_are_accepted():
    table = pa.table(
        {
            "sku": ["A"],
            "title": ["T"],
            "description": ["D"],
            "style": ["studio"],
            "updated_at": pa.array([1], pa.timestamp("ms")),
        }
    )
    (row,) = validate_catalog(table).rows
    assert row.updated_at.tzinfo is not None and row.image_uri is None and row.seed is None


def test_prompt_template_and_override():
    (row,) = validate_catalog(
        catalog_table([{"sku": "A", "title": "Stone mug.", "description": "Blue glaze"}])
    ).rows
    assert product_prompt(row) == f"Stone mug. Blue glaze. {STYLES['studio']}"
    (own,) = validate_catalog(catalog_table([{"sku": "A", "prompt": "My own prompt"}])).rows
    assert product_prompt(own) == "My own prompt"


def test_image_references_resolve_against_the_catalog(tmp_path):
    assert (
        resolve_reference("images/a.png", "s3://b/catalogs/x/catalog.parquet")
        == "s3://b/catalogs/x/images/a.png"
    )
    assert resolve_reference("../a.png", "s3://b/catalogs/x/catalog.parquet") == "s3://b/catalogs/a.png"
    assert resolve_reference("s3://o/a.png", "/any/catalog.parquet") == "s3://o/a.png"
    path = tmp_path / "catalog.parquet"
    pq.write_table(catalog_table([{"sku": "A", "image_uri": "img/a.png"}]), path)
    (row,) = load_catalog(str(path)).rows
    assert row.image_uri == str(tmp_path / "img" / "a.png")


def test_clip_ids_are_deterministic_and_follow_every_input():
    base = catalog_table([{"sku": "A"}, {"sku": "B", "seed": 7}])
    plan = plan_clips(validate_catalog(base), RULES, "run-1", {}, set())
    again = plan_clips(validate_catalog(base), RULES, "run-2", {}, set())
    assert [c.clip_id for c in plan.clips] == [c.clip_id for c in again.clips]
    assert plan.clips[0].request.seed == product_seed("A") and plan.clips[1].request.seed == 7
    changed = catalog_table([{"sku": "A", "description": "A different mug."}, {"sku": "B", "seed": 8}])
    replanned = plan_clips(validate_catalog(changed), RULES, "run-3", {}, set())
    assert all(a.clip_id != b.clip_id for a, b in zip(plan.clips, replanned.clips, strict=True))
    other_model = plan_clips(
        validate_catalog(base),
        replace(RULES, models=replace(RULES.models, text_model="ti2v-5b")),
        "r",
        {},
        set(),
    )
    assert other_model.clips[0].clip_id != plan.clips[0].clip_id
    # The post-production profile determines the clip too: another profile, or a changed one.
    other_profile = plan_clips(
        validate_catalog(base), replace(RULES, default_profile="social-30"), "r", {}, set()
    )
    assert other_profile.clips[0].clip_id != plan.clips[0].clip_id
    assert other_profile.clips[0].profile == "social-30"
    louder = replace(PROFILES["standard"], conform=replace(PROFILES["standard"].conform, target_fps=30))
    edited = plan_clips(
        validate_catalog(base), replace(RULES, profiles={**PROFILES, "standard": louder}), "r", {}, set()
    )
    assert edited.clips[0].clip_id != plan.clips[0].clip_id
    new_weights = plan_clips(
        validate_catalog(base), replace(RULES, model_versions={"t2v-a14b": "new-weights"}), "r", {}, set()
    )
    assert new_weights.clips[0].clip_id != plan.clips[0].clip_id
    new_logo = {**PROFILES, "standard": PROFILES["standard"].with_logo_digest(b"another logo")}
    relogo = plan_clips(validate_catalog(base), replace(RULES, profiles=new_logo), "r", {}, set())
    assert relogo.clips[0].clip_id != plan.clips[0].clip_id


def test_the_prompt_policy_refuses_clips_at_planning_in_the_row_locale():
    table = catalog_table(
        [
            {"sku": "FINE"},
            {"sku": "GORE", "prompt": "A mug covered in Gore and blood, beheaded figurine"},
            {"sku": "DE", "prompt": "Ein Becher, Enthauptung im Hintergrund", "locale": "de-AT"},
        ]
    )
    plan = plan_clips(validate_catalog(table), RULES, "run-1", {}, set())
    assert [c.sku for c in plan.clips] == ["FINE"]
    refused = {entry.sku: entry for entry in plan.refused}
    assert set(refused) == {"GORE", "DE"}
    for entry in refused.values():
        assert entry.status == ClipStatus.QUARANTINED and entry.stage == "prompt_policy" and entry.clip_id
        assert "prompt refused by the content policy: rule" in entry.reason
    assert "locale de" in refused["DE"].reason


def test_profiles_are_checked_per_row_and_against_the_clip_size():
    tiny_only = {
        **PROFILES,
        "native": replace(
            PROFILES["standard"],
            name="native",
            delivery=replace(PROFILES["standard"].delivery, min_short_side=0),
        ),
    }
    table = catalog_table(
        [
            {"sku": "STD"},
            {"sku": "NATIVE", "postprocess_profile": "native"},
            {"sku": "NOPE", "postprocess_profile": "cinema"},
        ]
    )
    plan = plan_clips(validate_catalog(table), replace(RULES, profiles=tiny_only), "run-1", {}, set())
    assert [(c.sku, c.profile) for c in plan.clips] == [("STD", "standard")]
    reasons = {entry.sku: entry.reason for entry in plan.rejected}
    # The tiny models make 96x64 frames: too small for the invisible watermark unless delivered larger.
    assert (
        "field 'size': profile 'native': 96x64 is too small for the invisible watermark" in reasons["NATIVE"]
    )
    assert (
        "field 'postprocess_profile': unknown profile 'cinema'; known: native, review, social-30, standard"
        in reasons["NOPE"]
    )


def test_profile_files_name_the_profile_and_table_at_fault(tmp_path):
    assert PROFILES["standard"].delivery.delivered_size(96, 64) == (384, 256)
    assert PROFILES["standard"].delivery.delivered_size(832, 480) == (832, 480)
    assert PROFILES["review"].conform_for(16).target_fps == 16
    with pytest.raises(ProfileError, match=r"profile 'web', table \[conform\]: unknown fields \['fsp'\]"):
        parse_profiles({"web": {"conform": {"fsp": 30}}}, tmp_path)
    with pytest.raises(ProfileError, match=r"profile 'web': unknown tables \['stabilise'\]"):
        parse_profiles({"web": {"stabilise": {"enabled": False}}}, tmp_path)
    with pytest.raises(ProfileError, match=r"profile 'web', table \[content_filter\]: sample_frames must be"):
        parse_profiles({"web": {"content_filter": {"sample_frames": 0}}}, tmp_path)


def test_published_clips_are_skipped_with_a_reason():
    catalog = validate_catalog(catalog_table([{"sku": "A"}, {"sku": "B"}]))
    first = plan_clips(catalog, RULES, "run-1", {}, set())
    second = plan_clips(catalog, RULES, "run-2", {}, {first.clips[0].clip_key})
    assert [c.sku for c in second.clips] == ["B"]
    (skipped,) = second.skipped
    assert (
        skipped.status == ClipStatus.SKIPPED and skipped.sku == "A" and "already published" in skipped.reason
    )


def test_rows_the_models_cannot_do_are_rejected_with_reasons():
    table = catalog_table(
        [
            {"sku": "OK"},
            {"sku": "UNKNOWN-MODEL", "model": "sora"},
            {"sku": "BAD-SIZE", "size": "1000x1000"},
            {"sku": "NO-IMAGE", "image_uri": "/nowhere/photo.png"},
            {"sku": "IMAGE-ON-T2V", "model": "t2v-a14b", "image_uri": "/here/photo.png"},
            {"sku": "I2V-NO-IMAGE", "model": "i2v-a14b"},
        ]
    )
    plan = plan_clips(
        validate_catalog(table), RULES, "run-1", {"/here/photo.png": ImageCheck(sha256="ab" * 32)}, set()
    )
    assert [c.sku for c in plan.clips] == ["OK"]
    reasons = {entry.sku: entry.reason for entry in plan.rejected}
    assert all(entry.status == ClipStatus.FAILED and entry.stage == "plan" for entry in plan.rejected)
    assert "field 'model': unknown model 'sora'" in reasons["UNKNOWN-MODEL"]
    assert "field 'size': 1000x1000 is not one of t2v-a14b-tiny's sizes" in reasons["BAD-SIZE"]
    assert "field 'image_uri': no image found at /nowhere/photo.png" in reasons["NO-IMAGE"]
    assert "takes no image" in reasons["IMAGE-ON-T2V"]
    assert "needs an image" in reasons["I2V-NO-IMAGE"]


def test_rows_choose_frames_and_steps_within_the_models_rules():
    table = catalog_table(
        [
            {"sku": "DEFAULT"},
            {"sku": "SHORT", "num_frames": 9, "steps": 4},
            {"sku": "NOT-4K1", "num_frames": 10},
            {"sku": "TOO-LONG", "num_frames": 81},
            {"sku": "NO-STEPS", "steps": 0},
        ]
    )
    catalog = validate_catalog(table)
    assert [(p.at.sku, p.field) for p in catalog.problems] == [("NO-STEPS", "steps")]
    plan = plan_clips(catalog, RULES, "run-1", {}, set())
    clips = {c.sku: c for c in plan.clips}
    assert sorted(clips) == ["DEFAULT", "SHORT"]
    assert (clips["DEFAULT"].request.num_frames, clips["DEFAULT"].request.steps) == (17, 40)  # tiny defaults
    assert (clips["SHORT"].request.num_frames, clips["SHORT"].request.steps) == (9, 4)
    reasons = {entry.sku: entry.reason for entry in plan.rejected}
    assert "field 'num_frames': 10 must be 4k+1 and at most 33" in reasons["NOT-4K1"]
    assert "field 'num_frames': 81 must be 4k+1 and at most 33" in reasons["TOO-LONG"]
    # Frames and steps determine the clip: the same row with other counts is another clip.
    longer = plan_clips(
        validate_catalog(catalog_table([{"sku": "SHORT", "num_frames": 13, "steps": 4}])),
        RULES,
        "run-2",
        {},
        set(),
    )
    assert longer.clips[0].clip_id != clips["SHORT"].clip_id


def test_synthetic_catalogs_are_valid_at_scale():
    table = synthetic_catalog(10_000, seed=1, image_uris=("s3://b/a.png",))
    catalog = validate_catalog(table)
    assert len(catalog.rows) == 10_000 and not catalog.problems
    assert synthetic_catalog(50, seed=1).equals(synthetic_catalog(50, seed=1))


def test_fleet_shapes():
    (cpu,) = plan_fleets({"t2v-a14b": 5, "i2v-a14b": 2}, gpus=0, cpu_actors_per_model=2, actor_cpus=0.5)
    assert cpu.actors == {"i2v-a14b": 2, "t2v-a14b": 2} and cpu.num_gpus == 0
    (shared,) = plan_fleets({"t2v-a14b": 90, "i2v-a14b": 10}, gpus=4, cpu_actors_per_model=1, actor_cpus=1)
    assert shared.actors == {"t2v-a14b": 3, "i2v-a14b": 1} and shared.num_gpus == 1
    turns = plan_fleets(
        {"t2v-a14b": 9, "i2v-a14b": 1, "ti2v-5b": 0}, gpus=1, cpu_actors_per_model=1, actor_cpus=1
    )
    assert [shape.actors for shape in turns] == [{"i2v-a14b": 1}, {"t2v-a14b": 1}]
    assert plan_fleets({}, gpus=8, cpu_actors_per_model=1, actor_cpus=1) == []


def test_a_bad_cell_fails_its_row_not_the_catalog():
    base = {"title": "Mug", "description": "A mug.", "style": "studio", "updated_at": NOW}
    table = pa.table(
        {
            "sku": ["GOOD", "NAN-SEED", "HUGE-SEED", "WORDS", "GOOD-2"],
            "title": ["Mug"] * 5,
            "description": ["A mug."] * 5,
            "style": ["studio"] * 5,
            "updated_at": pa.array([base["updated_at"]] * 5, pa.timestamp("us", tz="UTC")),
            # Floats (as pandas writes a seed column with a gap), one NaN, one past int64.
            "seed": pa.array([1.0, float("nan"), 2.0**70, 3.0, None], pa.float64()),
            # Text where a number belongs: pyarrow cannot cast the column.
            "num_frames": pa.array(["17", "17", "17", "seventeen", None], pa.string()),
        }
    )
    catalog = validate_catalog(table)
    assert [row.sku for row in catalog.rows] == ["GOOD", "GOOD-2"]
    assert catalog.rows[0].seed == 1 and catalog.rows[0].num_frames == 17
    problems = {(p.at.row, p.at.sku, p.field) for p in catalog.problems}
    assert problems == {(1, "NAN-SEED", "seed"), (2, "HUGE-SEED", "seed"), (3, "WORDS", "num_frames")}
    messages = [str(p) for p in catalog.problems]
    assert any(m.startswith("row 2 (sku 'HUGE-SEED'), field 'seed': ") for m in messages), messages


def test_a_rows_locale_adds_rules_and_never_removes_the_defaults():
    violent = "A mug on a table, a beheading in the background"
    table = catalog_table(
        [
            {"sku": "UNKNOWN", "prompt": violent, "locale": "zz"},
            {"sku": "GARBAGE", "prompt": violent, "locale": "en\x07\n"},
            {"sku": "FRENCH", "prompt": violent, "locale": "fr"},
            {"sku": "CASE", "prompt": "A mug", "locale": "EN-us"},
            {"sku": "UNDERSCORE", "prompt": "Nackte Frau am Strand", "locale": "de_at"},
        ]
    )
    catalog = validate_catalog(table)
    bad = {p.at.sku: str(p) for p in catalog.problems}
    assert set(bad) == {"UNKNOWN", "GARBAGE"}
    assert bad["UNKNOWN"] == (
        "row 0 (sku 'UNKNOWN'), field 'locale': 'zz' is not a BCP 47 language tag, e.g. en, de-AT or pt-BR"
    )
    assert {row.sku: row.locale for row in catalog.rows} == {
        "FRENCH": "fr",
        "CASE": "en-US",
        "UNDERSCORE": "de-AT",
    }
    plan = plan_clips(catalog, RULES, "run-1", {}, set())
    refused = {entry.sku: entry.reason for entry in plan.refused}
    # The default locale's (en) rules hold for a French row; the row's own (de) add to them.
    assert "rule en/violence/term:behead*" in refused["FRENCH"]
    assert "rule de/sexual/term:nackte" in refused["UNDERSCORE"]
    assert [clip.sku for clip in plan.clips] == ["CASE"]


def test_a_dry_run_makes_nothing_and_a_limit_makes_at_most_that_many():
    catalog = validate_catalog(catalog_table([{"sku": s} for s in ("A", "B", "C")]))
    plan = plan_clips(catalog, RULES, "run-1", {}, set())
    dry = hold_back(plan, "run-1", dry_run=True)
    assert dry.clips == [] and [e.sku for e in dry.deferred] == ["A", "B", "C"]
    assert all(
        e.status == ClipStatus.PLANNED and e.reason == "dry run: would be generated" for e in dry.deferred
    )
    assert all(e.estimated_gpu_seconds and e.estimated_gpu_seconds > 0 for e in dry.deferred)
    limited = hold_back(plan, "run-1", limit=2)
    assert [c.sku for c in limited.clips] == ["A", "B"] and [e.sku for e in limited.deferred] == ["C"]
    assert "limit of 2 clips" in limited.deferred[0].reason
    assert hold_back(plan, "run-1", limit=5).clips == plan.clips
    with pytest.raises(ValueError, match="at least 1"):
        hold_back(plan, "run-1", limit=0)
