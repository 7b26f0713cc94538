"""What keeps GPUs busy: an actor prepares the next clip while the current one holds the GPU, and
back-pressure lets frames queue for post-production up to a memory budget, not a fixed small window.

The actor object is driven directly (not through Ray) so the test can hold the render lock, as a
clip being denoised does, and see whether another clip's image fetch and prompt encoding go ahead.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from catalogs.rules import ModelDefaults
from catalogs.schema import CATALOG_SCHEMA, validate_catalog
from tasks.fleet import GeneratorActor, admits_generation, engine_options
from tasks.planning import PlanningRules, plan_clips
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import load_profiles

pytestmark = pytest.mark.usefixtures("tiny_models", "ray_cluster")


def clip_spec(settings):
    row = {
        "sku": "OVERLAP-1",
        "title": "Mug",
        "description": "A mug.",
        "style": "studio",
        "updated_at": datetime(2026, 11, 22, tzinfo=UTC),
        "model": "ti2v-5b",
    }
    rules = PlanningRules(
        models=ModelDefaults(variant="tiny", text_model="ti2v-5b", image_model="ti2v-5b"),
        profiles=load_profiles(),
        default_profile="standard",
        prompt_policy=PromptPolicy.load(),
    )
    catalog = validate_catalog(pa.Table.from_pylist([row], schema=CATALOG_SCHEMA))
    return plan_clips(catalog, rules, "run-overlap", {}, set()).clips[0]


@pytest.fixture(scope="module")
def actor(settings) -> GeneratorActor:
    return GeneratorActor(
        "ti2v-5b",
        "tiny",
        settings.model_root,
        settings.model_cache_dir,
        "cpu",
        settings.object_store(),
        engine_options(settings),
    )


def test_the_next_clip_is_prepared_while_the_current_one_renders(actor, settings, monkeypatch):
    assert actor.generator.prepares_concurrently  # the text encoder stays resident on this model
    spec = clip_spec(settings)
    expected = actor.generator.generate(spec.request).frames

    prepared = threading.Event()
    prepare = actor.generator.prepare

    def observed_prepare(request):
        result = prepare(request)
        prepared.set()
        return result

    monkeypatch.setattr(actor.generator, "prepare", observed_prepare)
    results = []
    with actor.render_lock:  # another clip is rendering
        worker = threading.Thread(target=lambda: results.append(actor.generate(spec)))
        worker.start()
        assert prepared.wait(60), "the clip waited for the GPU before encoding its prompts"
        worker.join(0.5)
        assert not results, "the clip rendered while another held the GPU"
    released = time.perf_counter()
    worker.join(60)
    since_released = time.perf_counter() - released
    _, clip = results[0]
    assert clip.error is None and clip.started_at is not None
    # Its GPU time is what it held the GPU for, its render included, not the wait for it.
    timings = (clip.seconds, clip.gpu_seconds, since_released)
    assert clip.seconds <= clip.gpu_seconds <= since_released and clip.gpu_type == "cpu", timings
    assert np.array_equal(clip.frames, expected)  # prepared apart, rendered later: the same frames


def test_the_actor_reports_its_load_time_and_attention_kernel(actor):
    worker, seconds, attention = actor.loaded()
    assert worker == actor.name() and worker.endswith(f"/cpu/pid{os.getpid()}")
    assert 0 < seconds < 120
    assert attention == "native"  # "auto" on a CPU: PyTorch SDPA, under diffusers' name for it


def test_back_pressure_bounds_waiting_frames_by_memory_not_by_a_fixed_window(settings):
    clip = clip_spec(settings)
    size = clip.frames_bytes
    assert size == clip.request.num_frames * clip.request.height * clip.request.width * 3
    budget = 10 * size
    # Under the floor, a clip may always start, whatever the budget.
    assert admits_generation([], [clip], clip, budget_bytes=0, floor_clips=2)
    # Over the floor: as long as the frames generating and waiting, and the new clip's, fit the budget.
    assert admits_generation([clip] * 2, [clip] * 7, clip, budget, floor_clips=2)
    assert not admits_generation([clip] * 2, [clip] * 8, clip, budget, floor_clips=2)
    assert not admits_generation([], [clip] * 10, clip, budget, floor_clips=2)
