"""wan_engine on the tiny random-weight models, loaded from disk like real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from wan_engine import (
    GenerationRequest,
    InvalidRequestError,
    WanGenerator,
    get_model_spec,
    save_random_pipeline,
)
from wan_engine.generator import STAGES, EngineOptions
from wan_engine.specs import UnknownModelError


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        family: save_random_pipeline(get_model_spec(family, "tiny"), root)
        for family in ("t2v-a14b", "i2v-a14b", "ti2v-5b")
    }


@pytest.fixture(scope="module")
def t2v(tiny_folders):
    return WanGenerator.from_pretrained(
        tiny_folders["t2v-a14b"], get_model_spec("t2v-a14b", "tiny"), device="cpu"
    )


def product_image(width: int = 96, height: int = 64) -> Image.Image:
    pixels = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_specs_carry_the_official_defaults():
    t2v, i2v, ti2v = (get_model_spec(f) for f in ("t2v-a14b", "i2v-a14b", "ti2v-5b"))
    assert (t2v.boundary_ratio, t2v.steps, t2v.guidance_scale, t2v.guidance_scale_2) == (0.875, 40, 4.0, 3.0)
    assert (t2v.flow_shift, t2v.fps, t2v.num_frames) == (12.0, 16, 81)
    assert (i2v.boundary_ratio, i2v.steps, i2v.guidance_scale, i2v.guidance_scale_2, i2v.flow_shift) == (
        0.9,
        40,
        3.5,
        3.5,
        5.0,
    )
    assert i2v.requires_image and not t2v.accepts_image and ti2v.accepts_image and not ti2v.requires_image
    assert ti2v.boundary_ratio is None and ti2v.expand_timesteps
    assert (ti2v.steps, ti2v.guidance_scale, ti2v.flow_shift, ti2v.fps, ti2v.num_frames) == (
        50,
        5.0,
        5.0,
        24,
        121,
    )
    assert ti2v.default_size == (1280, 704) and (832, 480) in t2v.sizes and (1280, 720) in t2v.sizes
    assert (
        t2v.architecture.transformer["num_layers"] == 40 and ti2v.architecture.transformer["num_layers"] == 30
    )
    # Tiny variants keep the denoising recipe.
    tiny = get_model_spec("t2v-a14b", "tiny")
    assert (tiny.steps, tiny.boundary_ratio, tiny.guidance_scale, tiny.flow_shift) == (40, 0.875, 4.0, 12.0)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="unknown model 'wan3'"):
        get_model_spec("wan3")


def test_same_seed_same_frames_and_both_experts_run(t2v):
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=11)
    first, second = t2v.generate(request), t2v.generate(request)
    assert first.frames.shape == (17, 64, 96, 3) and first.frames.dtype == np.uint8
    assert np.array_equal(first.frames, second.frames)
    other = t2v.generate(GenerationRequest(prompt="a red sneaker on a turntable", seed=12))
    assert not np.array_equal(first.frames, other.frames)
    # Classifier-free guidance: two forwards per step, split between the experts at the boundary.
    calls = first.expert_calls
    assert calls["high_noise"] > 0 and calls["low_noise"] > 0
    assert calls["high_noise"] + calls["low_noise"] == 2 * 40
    assert first.request.guidance_scale == 4.0 and first.request.guidance_scale_2 == 3.0


def test_the_video_says_how_long_each_of_its_stages_took(t2v):
    video = t2v.generate(GenerationRequest(prompt="a red sneaker", seed=1, num_frames=5, steps=2))
    assert list(video.stage_seconds) == list(STAGES)
    assert all(seconds > 0 for seconds in video.stage_seconds.values()), video.stage_seconds
    # The render's stages lie inside its wall time; the prompts were encoded before it started.
    rendered = sum(video.stage_seconds[stage] for stage in ("denoise", "decode", "handback"))
    assert rendered <= video.seconds


def test_requests_are_checked_before_generation(t2v):
    with pytest.raises(InvalidRequestError) as err:
        t2v.generate(
            GenerationRequest(prompt="x", seed=1, num_frames=16, width=100, height=64, image=product_image())
        )
    fields = {problem.field for problem in err.value.problems}
    assert fields == {"num_frames", "size", "image"}
    assert "4k+1" in str(err.value) and "takes no image" in str(err.value)


def test_image_to_video_needs_an_image_and_uses_it(tiny_folders):
    spec = get_model_spec("i2v-a14b", "tiny")
    generator = WanGenerator.from_pretrained(tiny_folders["i2v-a14b"], spec, device="cpu")
    with pytest.raises(InvalidRequestError, match="needs an image"):
        generator.validate(GenerationRequest(prompt="a lamp", seed=1))
    video = generator.generate(GenerationRequest(prompt="a lamp", seed=1, image=product_image()))
    assert video.frames.shape == (17, 64, 96, 3)
    assert video.expert_calls["high_noise"] > 0 and video.expert_calls["low_noise"] > 0


def test_ti2v_is_one_dense_model_for_text_and_image(tiny_folders):
    spec = get_model_spec("ti2v-5b", "tiny")
    generator = WanGenerator.from_pretrained(tiny_folders["ti2v-5b"], spec, device="cpu")
    from_text = generator.generate(GenerationRequest(prompt="a bottle", seed=5))
    from_image = generator.generate(GenerationRequest(prompt="a bottle", seed=5, image=product_image()))
    assert from_text.expert_calls == {"dense": 2 * 50} == from_image.expert_calls
    assert from_text.frames.shape == from_image.frames.shape == (17, 64, 96, 3)
    assert not np.array_equal(from_text.frames, from_image.frames)


def test_weights_of_another_model_are_refused(tiny_folders):
    with pytest.raises(ValueError, match="not that model"):
        WanGenerator.from_pretrained(
            tiny_folders["ti2v-5b"], get_model_spec("t2v-a14b", "tiny"), device="cpu"
        )


def stock_frames(generator: WanGenerator, request: GenerationRequest) -> np.ndarray:
    """The same request through diffusers' own pipeline, built from the same components."""
    resolved = generator.validate(request)
    spec = generator.spec
    pipeline_class = WanImageToVideoPipeline if request.image is not None else type(generator.pipeline)
    pipeline = (
        pipeline_class.from_pipe(generator.pipeline) if request.image is not None else generator.pipeline
    )
    extra = {"image": request.image} if request.image is not None else {}
    if spec.is_moe:
        extra["guidance_scale_2"] = resolved.guidance_scale_2
    frames = pipeline(
        prompt=resolved.prompt,
        negative_prompt=resolved.negative_prompt,
        height=resolved.height,
        width=resolved.width,
        num_frames=resolved.num_frames,
        num_inference_steps=resolved.steps,
        guidance_scale=resolved.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(resolved.seed),
        max_sequence_length=spec.max_sequence_length,
        output_type="np",
        **extra,
    ).frames[0]
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("family", "with_image"),
    [("t2v-a14b", False), ("i2v-a14b", True), ("ti2v-5b", False), ("ti2v-5b", True)],
)
def test_exact_mode_gives_the_frames_of_stock_diffusers(tiny_folders, family, with_image):
    spec = get_model_spec(family, "tiny")
    generator = WanGenerator.from_pretrained(tiny_folders[family], spec, device="cpu")
    assert generator.options == EngineOptions()  # the default is the exact mode
    assert generator.attention_backend is None  # "auto" on a CPU: PyTorch's SDPA, as stock diffusers
    request = GenerationRequest(prompt="a red sneaker", seed=3, image=product_image() if with_image else None)
    ours, stock = generator.generate(request).frames, stock_frames(generator, request)
    difference = np.abs(ours.astype(np.int16) - stock.astype(np.int16))
    # float32 on the CPU: batching the two guidance passes moves values by float rounding only.
    assert difference.max() <= 1 and difference.mean() < 1e-3, (difference.max(), difference.mean())


def _block_runs(generator: WanGenerator) -> dict[str, int]:
    """How many times each expert's first block really computed (a cached step skips it)."""
    runs = dict.fromkeys(generator.experts, 0)
    for name, expert in generator.experts.items():

        def count(*_: object, name: str = name) -> None:
            runs[name] += 1

        expert.blocks[0].attn1.register_forward_pre_hook(count)
    return runs


def test_step_cache_is_opt_in_skips_blocks_and_stays_near_exact(tiny_folders):
    spec = get_model_spec("t2v-a14b", "tiny")
    load = WanGenerator.from_pretrained
    exact = load(tiny_folders["t2v-a14b"], spec, device="cpu")
    cached = load(tiny_folders["t2v-a14b"], spec, device="cpu", options=EngineOptions(step_cache_interval=3))
    assert EngineOptions().mode == "exact" and cached.options.mode == "approximate:step-cache-3"
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=5, steps=20)
    exact_runs, cached_runs = _block_runs(exact), _block_runs(cached)
    reference, approximate = exact.generate(request), cached.generate(request)
    # Every step still calls each expert once (the hook skips its blocks inside), but blocks ran less:
    # per expert 3 warm-up steps, then one full step in every 3 (diffusers' schedule: steps 4, 7, 10, ...).
    assert approximate.expert_calls == reference.expert_calls
    assert sum(exact_runs.values()) == 20
    for name, steps in exact_runs.items():
        full_steps = sum(1 for step in range(steps) if step < 3 or (step - 4) % 3 == 0)
        assert cached_runs[name] == full_steps < steps, (name, steps, cached_runs)
    drift = np.abs(approximate.frames.astype(int) - reference.frames.astype(int)).mean()
    assert 0 < drift < 20, drift  # approximate, not garbage
    # The cache is reset per clip: the same request gives the same frames again.
    assert np.array_equal(cached.generate(request).frames, approximate.frames)


def test_fp8_is_refused_where_the_device_cannot_run_it(tiny_folders):
    spec = get_model_spec("ti2v-5b", "tiny")
    with pytest.raises(ValueError, match="compute capability 8.9"):
        WanGenerator.from_pretrained(
            tiny_folders["ti2v-5b"], spec, device="cpu", options=EngineOptions(fp8_matmuls=True)
        )


def test_the_warm_up_clip_has_the_shape_the_options_name(tiny_folders):
    spec = get_model_spec("i2v-a14b", "tiny")
    generator = WanGenerator.from_pretrained(
        tiny_folders["i2v-a14b"], spec, device="cpu", options=EngineOptions(warmup_shape=(64, 96, 9))
    )
    shapes = []
    generate = generator.generate
    generator.generate = lambda request: shapes.append(generate(request).frames.shape)
    generator.warm_up()
    assert shapes == [(9, 96, 64, 3)]  # frames, height, width: not the default 96x64 x 17
