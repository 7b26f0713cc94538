"""Recipes and adapters from catalog row and prompt sheet to the fleet: validation by row and field, clip
ids that follow recipe, adapter bytes and scale, actors that swap adapters as rarely as possible, and a
nightly run on the real services whose manifest records what each clip was made with."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs.adapters import AdapterRegistryError, load_adapter_registry, parse_adapters
from catalogs.problems import InvalidValue
from catalogs.rules import ModelDefaults
from catalogs.schema import CATALOG_SCHEMA, validate_catalog
from catalogs.sheets import SheetRules, read_prompt_sheet, variants_from_table
from infra.settings import Settings
from tasks.fleet import ClipQueue, actor_groups, adapter_key, engine_options
from tasks.planning import AdapterCheck, PlanningRules, plan_clips
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import load_profiles
from tasks.records import ClipStatus, ManifestEntry
from wan_engine import adapter_digest
from wan_engine.cost import estimated_gpu_seconds

NOW = datetime(2026, 12, 6, tzinfo=UTC)
REGISTRY = load_adapter_registry(None, "s3://wanfactory/adapters/tiny")


def rules(**overrides) -> PlanningRules:
    checks = {name: AdapterCheck(digest=f"digest-of-{name}") for name in REGISTRY.entries}
    return PlanningRules(
        models=ModelDefaults(variant="tiny", text_model="t2v-a14b", image_model="i2v-a14b"),
        profiles=load_profiles(),
        default_profile="standard",
        prompt_policy=PromptPolicy.load(),
        adapters=REGISTRY,
        adapter_checks=overrides.pop("adapter_checks", checks),
        **overrides,
    )


def plan(rows: list[dict], planning_rules: PlanningRules | None = None):
    table = pa.Table.from_pylist(
        [{"title": "Mug", "description": "A mug.", "style": "studio", "updated_at": NOW, **r} for r in rows],
        schema=CATALOG_SCHEMA,
    )
    return plan_clips(validate_catalog(table), planning_rules or rules(), "run-1", {}, set())


def test_bad_recipe_and_adapter_cells_are_row_and_field_errors_and_good_rows_plan():
    result = plan(
        [
            {"sku": "OK", "recipe": "lightx2v-4step", "adapters": "acme-style:0.5"},
            {"sku": "NO-RECIPE", "recipe": "turbo-9000"},
            {"sku": "NO-ADAPTER", "adapters": "nobody-style"},
            {"sku": "OTHER-MODEL", "adapters": "acme-style-5b"},
            {"sku": "TOO-STRONG", "adapters": "acme-style:1.5"},
            {"sku": "RECIPE-ONLY", "adapters": "wan2.2-t2v-a14b-lightx2v-4step"},
            {"sku": "SYNTAX", "adapters": "acme-style:strong"},
            {"sku": "STEPS", "recipe": "lightx2v-4step", "steps": 8},
            {"sku": "5B-4STEP", "model": "ti2v-5b", "recipe": "lightx2v-4step"},
        ]
    )
    assert [clip.sku for clip in result.clips] == ["OK"]
    reasons = {entry.sku: (entry.stage, entry.reason) for entry in result.rejected}
    assert reasons == {
        "NO-RECIPE": (
            "plan",
            "row 1 (sku 'NO-RECIPE'), field 'recipe': t2v-a14b has no recipe 'turbo-9000'; "
            "known: standard, lightx2v-4step",
        ),
        "NO-ADAPTER": (
            "plan",
            "row 2 (sku 'NO-ADAPTER'), field 'adapters': unknown adapter 'nobody-style'; "
            "registered: acme-style, acme-style-5b, acme-style-i2v",
        ),
        "OTHER-MODEL": (
            "plan",
            "row 3 (sku 'OTHER-MODEL'), field 'adapters': "
            "acme-style-5b is an adapter for ti2v-5b, not t2v-a14b",
        ),
        "TOO-STRONG": (
            "plan",
            "row 4 (sku 'TOO-STRONG'), field 'adapters': "
            "scale 1.5 of acme-style is outside its range 0 to 1.2",
        ),
        "RECIPE-ONLY": (
            "plan",
            "row 5 (sku 'RECIPE-ONLY'), field 'adapters': wan2.2-t2v-a14b-lightx2v-4step is "
            "part of a recipe, not an adapter for rows; choose the recipe instead",
        ),
        "SYNTAX": (
            "validate",
            "row 6 (sku 'SYNTAX'), field 'adapters': scale 'strong' of acme-style is not a number",
        ),
        "STEPS": (
            "plan",
            "row 7 (sku 'STEPS'), field 'steps': recipe lightx2v-4step runs exactly 4 steps (the "
            "timesteps its weights were distilled at), not 8",
        ),
        "5B-4STEP": (
            "plan",
            "row 8 (sku '5B-4STEP'), field 'recipe': ti2v-5b has no recipe 'lightx2v-4step'; known: standard",
        ),
    }, reasons


def test_the_clip_carries_its_recipe_adapters_and_trigger_words_into_request_and_manifest():
    (clip,) = plan([{"sku": "OK", "recipe": "lightx2v-4step", "adapters": "acme-style"}]).clips
    request = clip.request
    assert (request.recipe, request.steps, request.guidance_scale, request.guidance_scale_2) == (
        "lightx2v-4step",
        4,
        1.0,
        1.0,
    )
    assert request.prompt.endswith(", acme studio look")  # the registry's trigger words, appended once
    (adapter,) = request.adapters
    assert (adapter.name, adapter.scale, adapter.digest) == ("acme-style", 0.8, "digest-of-acme-style")
    assert dict(adapter.files) == {
        "high_noise": "s3://wanfactory/adapters/tiny/brands/acme-style/t2v/high_noise.safetensors",
        "low_noise": "s3://wanfactory/adapters/tiny/brands/acme-style/t2v/low_noise.safetensors",
    }
    assert [a.name for a in clip.fused_adapters] == ["wan2.2-t2v-a14b-lightx2v-4step"]
    assert clip.loadout.name == "t2v-a14b+wan2.2-t2v-a14b-lightx2v-4step"
    entry = ManifestEntry.of_clip(clip, "run-1", ClipStatus.PLANNED)
    assert entry.recipe == "lightx2v-4step"
    assert entry.adapters == [
        {
            "name": "wan2.2-t2v-a14b-lightx2v-4step",
            "scale": 1.0,
            "fused": True,
            "digest": "digest-of-wan2.2-t2v-a14b-lightx2v-4step",
        },
        {"name": "acme-style", "scale": 0.8, "fused": False, "digest": "digest-of-acme-style"},
    ]
    # Four forwards without guidance instead of 40 steps with it: a twentieth of the standard denoising,
    # and the same decode. The figures are the H200 bench's: 4-step 12.52 s; exact H100 211.74 s.
    (standard,) = plan([{"sku": "OK"}]).clips
    real_size = {"width": 832, "height": 480, "num_frames": 81}  # the tiny models' clips are smaller
    four_step = estimated_gpu_seconds(clip.model, replace(clip.request, **real_size))
    exact = estimated_gpu_seconds(standard.model, replace(standard.request, **real_size))
    assert four_step == pytest.approx(12.52, rel=0.01)
    assert exact == pytest.approx(211.74, rel=0.01)


def test_clip_ids_follow_recipe_adapter_bytes_and_scale_and_nothing_else():
    def clip_id(row: dict, planning_rules: PlanningRules | None = None) -> str:
        return plan([{"sku": "MUG", **row}], planning_rules).clips[0].clip_id

    base = clip_id({})
    # A registry and adapter checks change nothing for a clip that uses neither: old clips keep their ids.
    bare = PlanningRules(
        models=ModelDefaults(variant="tiny", text_model="t2v-a14b", image_model="i2v-a14b"),
        profiles=load_profiles(),
        default_profile="standard",
        prompt_policy=PromptPolicy.load(),
    )
    assert clip_id({}, bare) == base
    assert clip_id({"recipe": "standard"}) == base
    four_step = clip_id({"recipe": "lightx2v-4step"})
    styled = clip_id({"adapters": "acme-style:0.5"})
    assert len({base, four_step, styled, clip_id({"adapters": "acme-style:0.6"})}) == 4
    assert clip_id({"adapters": "acme-style:0.8"}) == clip_id({"adapters": "acme-style"})  # its default
    new_bytes = {name: AdapterCheck(digest=f"v2-{name}") for name in REGISTRY.entries}
    assert clip_id({"adapters": "acme-style:0.5"}, rules(adapter_checks=new_bytes)) != styled
    assert clip_id({"recipe": "lightx2v-4step"}, rules(adapter_checks=new_bytes)) != four_step
    # The run's default recipe applies where the model has it; TI2V-5B has no 4-step recipe.
    assert clip_id({}, rules(default_recipe="lightx2v-4step")) == four_step
    plan_5b = plan([{"sku": "5B", "model": "ti2v-5b"}], rules(default_recipe="lightx2v-4step"))
    assert plan_5b.clips[0].request.recipe == "standard"


def test_an_adapter_whose_files_are_missing_fails_only_the_rows_that_name_it():
    checks = {name: AdapterCheck(digest="d") for name in REGISTRY.entries}
    checks["acme-style"] = AdapterCheck(problem="no adapter file at s3://wanfactory/adapters/x.safetensors")
    result = plan([{"sku": "A", "adapters": "acme-style"}, {"sku": "B"}], rules(adapter_checks=checks))
    assert [clip.sku for clip in result.clips] == ["B"]
    assert result.rejected[0].reason == (
        "row 0 (sku 'A'), field 'adapters': acme-style: no adapter file at s3://wanfactory/adapters/x.safetensors"
    )


def test_adapter_digests_change_with_the_bytes(tmp_path: Path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"one")
    first = adapter_digest((("dense", str(path)),))
    assert adapter_digest((("dense", str(path)),)) == first
    path.write_bytes(b"two!")
    assert adapter_digest((("dense", str(path)),)) != first


def test_adapter_cells_parse_strictly():
    assert parse_adapters(" acme-style:0.5 , other ") == (("acme-style", 0.5), ("other", None))
    assert parse_adapters("") == () and parse_adapters(None) == ()
    for cell, message in [
        ("a,a", "names a twice"),
        ("a:nan", "finite"),
        ("a:1:2", "not a number"),
        ("bad name", "bad name"),
        ("a,b,c,d,e", "at most 4"),
    ]:
        with pytest.raises(InvalidValue, match=message):
            parse_adapters(cell)


def test_a_broken_registry_is_one_line_naming_the_entry_and_field(tmp_path: Path):
    path = tmp_path / "adapters.toml"
    path.write_text('[adapters.x]\nfamily = "t2v-a14b"\ndense = "x.safetensors"\n')
    with pytest.raises(AdapterRegistryError, match=r"adapter 'x': dense is no expert of t2v-a14b"):
        load_adapter_registry(path, "/adapters")
    path.write_text(
        '[adapters.x]\nfamily = "t2v-a14b"\nhigh_noise = "x"\nscale_range = [0, 1]\ndefault_scale = 3\n'
    )
    with pytest.raises(AdapterRegistryError, match=r"default_scale 3.0 is outside scale_range"):
        load_adapter_registry(path, "/adapters")
    path.write_text('[adapters.x]\nfamily = "t2v-a14b"\nhigh_noise = "x"\ncolour = "red"\n')
    with pytest.raises(AdapterRegistryError, match=r"adapter 'x': colour: Extra inputs are not permitted"):
        load_adapter_registry(path, "/adapters")


def test_prompt_sheets_take_recipe_and_adapter_columns_and_check_them_on_read():
    sheet = (
        b"experiment_id,variant_id,prompt,recipe,LoRA\n"
        b"spring,fast,A mug on a table,lightx2v-4step,acme-style:0.6\n"
        b"spring,slow,A mug on a table,,\n"
        b"spring,bad,A mug on a table,turbo,acme-style-5b\n"
    )
    read = read_prompt_sheet(
        sheet,
        "sheet.csv",
        rules=SheetRules(
            models=ModelDefaults(variant="tiny", text_model="t2v-a14b", image_model="i2v-a14b"),
            adapters=REGISTRY,
        ),
    )
    assert [str(p) for p in read.problems] == [
        "row 4, column 'recipe': t2v-a14b has no recipe 'turbo'; known: standard, lightx2v-4step",
        "row 4, column 'LoRA': acme-style-5b is an adapter for ti2v-5b, not t2v-a14b",
    ]
    fast, slow = variants_from_table(read.table)  # through the Parquet form the run reads back
    assert (fast.recipe, fast.adapters) == ("lightx2v-4step", (("acme-style", 0.6),))
    assert (slow.recipe, slow.adapters) == (None, ())


def test_actors_take_the_clips_of_the_adapters_they_hold_first():
    rows = [{"sku": f"S{i}", "adapters": ["acme-style:0.5", "", "acme-style:1.0"][i % 3]} for i in range(12)]
    clips = plan(rows).clips
    queue = ClipQueue(clips)
    holding = {"a": (), "b": ()}
    swaps = 0
    while queue:
        for actor in holding:
            if queue:
                clip = queue.take(holding[actor])
                swaps += adapter_key(clip) != holding[actor]
                holding[actor] = adapter_key(clip)
    # Three sets of four over two actors: each actor swaps at most once per set it serves.
    assert swaps <= 4, swaps
    (group,) = actor_groups(clips, slot_rank=64).values()
    assert group.adapter_slot_rank == 64 and group.loadout.family == "t2v-a14b"
    (plain,) = actor_groups(plan([{"sku": "P"}]).clips, slot_rank=64).values()
    assert plain.adapter_slot_rank == 0  # no clip names adapters: no slot, no per-step cost


def test_an_actor_group_warms_up_at_the_shape_most_of_its_clips_have():
    clips = plan([{"sku": "A", "size": "64x96"}, {"sku": "B", "size": "64x96"}, {"sku": "C"}]).clips
    (group,) = actor_groups(clips, slot_rank=0).values()
    assert group.warmup_shape == (64, 96, 17)  # the tiny A14B's 17 frames; its default size is 96x64
    options = engine_options(Settings(), group)
    assert options.warmup_shape == group.warmup_shape and options.adapter_slot_rank == 0


@pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")
def test_a_nightly_run_makes_four_step_and_styled_clips_and_records_them(store):
    from flows.nightly import nightly_catalog

    rows = [
        {
            "sku": "FAST",
            "title": "Mug",
            "description": "Blue mug.",
            "style": "studio",
            "recipe": "lightx2v-4step",
        },
        {
            "sku": "FAST-STYLED",
            "title": "Mug",
            "description": "Red mug.",
            "style": "studio",
            "recipe": "lightx2v-4step",
            "adapters": "acme-style:0.5",
        },
        {
            "sku": "STYLED",
            "title": "Lamp",
            "description": "A lamp.",
            "style": "studio",
            "adapters": "acme-style",
        },
        {
            "sku": "BAD-SCALE",
            "title": "Lamp",
            "description": "d",
            "style": "studio",
            "adapters": "acme-style:9",
        },
    ]
    buffer = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist([{**r, "updated_at": NOW} for r in rows], schema=CATALOG_SCHEMA), buffer
    )
    store.put_bytes("catalogs/recipes/catalog.parquet", buffer.getvalue(), "application/vnd.apache.parquet")

    result = nightly_catalog(catalog_uri=store.uri("catalogs/recipes/catalog.parquet"))

    by_sku = {entry.sku: entry for entry in result.entries}
    for sku in ("FAST", "FAST-STYLED", "STYLED"):
        assert by_sku[sku].status == ClipStatus.PUBLISHED, by_sku[sku].reason
        assert store.exists(by_sku[sku].clip_key)
    assert (
        by_sku["BAD-SCALE"].status == ClipStatus.FAILED and "field 'adapters'" in by_sku["BAD-SCALE"].reason
    )
    # Four forwards, two per expert, and no unconditional pass (a guided pair would count two each).
    assert by_sku["FAST"].expert_calls == {"high_noise": 2, "low_noise": 2}
    assert by_sku["FAST-STYLED"].adapter_swap_seconds is not None  # its style was swapped in, and timed
    manifest = json.loads(store.get_bytes(result.manifest.json_key))
    recorded = {clip["sku"]: (clip["recipe"], json.loads(clip["adapters"])) for clip in manifest["clips"]}
    assert recorded["FAST"][0] == "lightx2v-4step" and [a["name"] for a in recorded["FAST"][1]] == [
        "wan2.2-t2v-a14b-lightx2v-4step"
    ]
    assert [(a["name"], a["scale"], a["fused"]) for a in recorded["FAST-STYLED"][1]] == [
        ("wan2.2-t2v-a14b-lightx2v-4step", 1.0, True),
        ("acme-style", 0.5, False),
    ]
    assert recorded["STYLED"][0] == "standard"
    # The 4-step clips came from actors holding the fused distillation, the standard one from others.
    workers = {sku: by_sku[sku].worker for sku in ("FAST", "FAST-STYLED", "STYLED")}
    assert workers["STYLED"] not in (workers["FAST"], workers["FAST-STYLED"])
