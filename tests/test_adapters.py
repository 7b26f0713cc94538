"""Adapters and recipes in the engine on the tiny models (issue 14, item 5).

Every comparison is against weights merged by hand: a pipeline loaded from the same folder
whose transformers are :func:`tests.lora_files.merged_copy` copies (``W + s * alpha / rank *
up @ down``, from the deltas each tiny LoRA file was written with). Such a reference runs the
engine's own denoising loop (:meth:`WanGenerator.denoise`) on the resolved request of the
generator under test, so the only difference left is how the adapter got into the weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from tests.lora_files import LAYOUTS, LoraFile, merged_copy, write_lora
from wan_engine import (
    AdapterWeights,
    GenerationRequest,
    InvalidRequestError,
    WanGenerator,
    adapter_digest,
    get_model_spec,
    get_recipe,
    save_random_pipeline,
)
from wan_engine.generator import EngineOptions
from wan_engine.lora import AdapterError

T2V = get_model_spec("t2v-a14b", "tiny")
I2V = get_model_spec("i2v-a14b", "tiny")
TI2V = get_model_spec("ti2v-5b", "tiny")
FOUR_STEP = "lightx2v-4step"
COMPONENT = {"high_noise": "transformer", "low_noise": "transformer_2", "dense": "transformer"}
SLOT_RANK = 8
PROMPT = "a red sneaker on a turntable"
# float32 on a CPU: W x + B (A x) against (W + B A) x, and fuse_lora's merge against ours, differ by
# rounding only: the latents (of magnitude ~1) by at most 2e-6 here, the fused weights not at all;
# frames by at most one 8-bit level.
LATENTS = {"rtol": 1e-5, "atol": 1e-5}
WEIGHTS = {"rtol": 1e-6, "atol": 1e-7}

Deltas = dict[str, list[tuple[LoraFile, float]]]


def load(folder: Path, spec, **kwargs) -> WanGenerator:
    return WanGenerator.from_pretrained(folder, spec, device="cpu", **kwargs)


def slotted(folder: Path, spec) -> WanGenerator:
    return load(folder, spec, options=EngineOptions(adapter_slot_rank=SLOT_RANK))


def hand_merged(folder: Path, spec, deltas: Deltas) -> WanGenerator:
    """A generator on ``folder``'s weights with each expert's LoRA deltas added to them by hand."""
    pipeline = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipeline.scheduler = type(pipeline.scheduler).from_config(
        pipeline.scheduler.config, flow_shift=spec.flow_shift
    )
    for expert, loras in deltas.items():
        component = COMPONENT[expert]
        for lora, scale in loras:
            setattr(pipeline, component, merged_copy(getattr(pipeline, component), lora, scale))
    return WanGenerator(pipeline, spec, torch.device("cpu"))


def adapter(name: str, files: dict[str, LoraFile], scale: float = 1.0) -> AdapterWeights:
    paths = tuple((expert, str(lora.path)) for expert, lora in files.items())
    return AdapterWeights(name, paths, scale, adapter_digest(paths))


@torch.inference_mode()
def clip_latents(
    generator: WanGenerator, request: GenerationRequest
) -> tuple[GenerationRequest, torch.Tensor]:
    """The resolved request and its final latents, as :meth:`WanGenerator.render` makes them: the
    clip's adapters swapped into the slot first, under inference mode."""
    prepared = generator.prepare(request)
    if generator.adapter_slot is not None:
        generator.adapter_slot.use(prepared.request.adapters)
    return prepared.request, generator.denoise(prepared.request, (prepared.positive, prepared.negative))


@torch.inference_mode()
def reference_latents(reference: WanGenerator, resolved: GenerationRequest) -> torch.Tensor:
    """The same loop on the hand-merged weights (no validation: it holds no adapters to refuse for).

    Under inference mode, as a clip runs: outside it the text encoder takes other kernels (values
    differ in the last bits) and the generator would cache that negative prompt for later clips.
    """
    return reference.denoise(resolved)


def clip(**fields: object) -> GenerationRequest:
    """A request for a small clip (5 frames of 64x64: 2 latent frames of 8x8), to keep the tests fast."""
    return GenerationRequest(**{"prompt": PROMPT, "num_frames": 5, "width": 64, "height": 64, **fields})


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def product_image(width: int = 64, height: int = 64) -> Image.Image:
    pixels = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def record_forwards(generator: WanGenerator) -> tuple[list[tuple[str, int, float]], list]:
    """(expert, batch, first timestep) of every expert forward from now on; and the hooks' handles."""
    calls: list[tuple[str, int, float]] = []
    handles = []
    for name, module in generator.experts.items():

        def hook(_: torch.nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            calls.append((name, kwargs["hidden_states"].shape[0], float(kwargs["timestep"].flatten()[0])))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models' ops are microseconds, so OpenMP's fan-out is overhead, and
    on a busy two-core machine its spin-waits made this file ten times slower (128 s against 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {spec.family: save_random_pipeline(spec, root) for spec in (T2V, I2V, TI2V)}


@pytest.fixture(scope="module")
def base(folders) -> WanGenerator:
    """T2V with no adapter and no slot: the base weights."""
    return load(folders["t2v-a14b"], T2V)


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory) -> dict[tuple[str, str, str], LoraFile]:
    """Tiny T2V LoRAs by (role, layout, expert): a distill pair (LightX2V layout, with ``diff_b`` bias
    deltas as LightX2V files carry), and per-clip styles in every layout, a different seed per file."""
    root = tmp_path_factory.mktemp("loras")
    files = {}
    seed = 0
    for role, layouts in (("distill", ("lightx2v",)), ("style", LAYOUTS), ("other", ("musubi",))):
        for layout in layouts:
            for expert, module in base.experts.items():
                seed += 1
                options = {"bias": True} if role == "distill" else {}
                files[role, layout, expert] = write_lora(
                    module,
                    root / f"{role}-{layout}-{expert}.safetensors",
                    layout,
                    rank=4,
                    seed=seed,
                    **options,
                )
    # A third rank-4 style: with two others it needs rank 12, more than the slot's 8.
    for expert, module in base.experts.items():
        seed += 1
        files["third", "peft", expert] = write_lora(
            module, root / f"third-{expert}.safetensors", "peft", seed=seed
        )
    return files


def pair(loras, role: str, layout: str) -> dict[str, LoraFile]:
    return {expert: loras[role, layout, expert] for expert in ("high_noise", "low_noise")}


@pytest.fixture(scope="module")
def distill(loras) -> AdapterWeights:
    name, scale = get_recipe(T2V, FOUR_STEP).fused_adapters[0]
    return adapter(name, pair(loras, "distill", "lightx2v"), scale)


@pytest.fixture(scope="module")
def fused(folders, distill) -> WanGenerator:
    return load(folders["t2v-a14b"], T2V, fused_adapters=[distill])


@pytest.fixture(scope="module")
def fused_reference(folders, loras) -> WanGenerator:
    files = pair(loras, "distill", "lightx2v")
    return hand_merged(folders["t2v-a14b"], T2V, {expert: [(lora, 1.0)] for expert, lora in files.items()})


@pytest.fixture(scope="module")
def slot(folders) -> WanGenerator:
    return slotted(folders["t2v-a14b"], T2V)


# --- 1. fused -------------------------------------------------------------------------------------


def test_fused_pair_merges_each_file_into_its_own_expert_only(base, fused, fused_reference, loras):
    files = pair(loras, "distill", "lightx2v")
    assert [recipe.name for recipe in fused.recipes] == [FOUR_STEP]
    for expert, module in fused.experts.items():
        # Fused and unloaded: plain linears again, nothing extra per step.
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
        got = module.state_dict()
        want = fused_reference.experts[expert].state_dict()
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], **WEIGHTS, msg=f"{expert} {key}")
        # The other expert's file would be a different, large change: this is its own file, not both.
        other = files["low_noise" if expert == "high_noise" else "high_noise"]
        crossed = merged_copy(base.experts[expert], other).state_dict()
        key = "blocks.0.attn1.to_q.weight"
        assert (got[key] - crossed[key]).abs().max() > 0.05
        # Only the targeted layers moved: everything else is the base's, exactly.
        base_state = base.experts[expert].state_dict()
        moved = {k for k in base_state if not torch.equal(base_state[k], got[k])}
        targeted = {f"{name}.weight" for name in files[expert].weight_deltas}
        targeted |= {f"{name}.bias" for name in files[expert].bias_deltas}
        assert moved == targeted


def test_fused_pair_gives_the_hand_merged_latents_and_frames(fused, fused_reference):
    request = clip(seed=4, recipe=FOUR_STEP)
    resolved, latents = clip_latents(fused, request)
    torch.testing.assert_close(latents, reference_latents(fused_reference, resolved), **LATENTS)
    frames = fused.generate(request).frames
    with torch.inference_mode():
        expected = fused_reference.decode(reference_latents(fused_reference, resolved))
    assert max_level_difference(frames, expected) <= 1


# --- 2. per clip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_clip_adapter_in_each_layout_gives_the_hand_merged_latents(folders, base, slot, loras, layout):
    files, scale = pair(loras, "style", layout), 0.7
    request = clip(seed=6, steps=4, adapters=(adapter(layout, files, scale),))
    resolved, latents = clip_latents(slot, request)
    reference = hand_merged(
        folders["t2v-a14b"], T2V, {expert: [(lora, scale)] for expert, lora in files.items()}
    )
    calls, handles = record_forwards(reference)
    try:
        expected = reference_latents(reference, resolved)
    finally:
        for handle in handles:
            handle.remove()
    assert {name for name, _, _ in calls} == {"high_noise", "low_noise"}  # both experts ran
    torch.testing.assert_close(latents, expected, **LATENTS)
    # And the adapter does change the clip.
    assert (latents - reference_latents(base, resolved)).abs().max() > 1e-3


def test_an_adapter_for_one_expert_leaves_the_other_at_base(folders, slot, loras):
    high = loras["style", "musubi", "high_noise"]
    request = clip(seed=6, steps=4, adapters=(adapter("high-only", {"high_noise": high}, 0.9),))
    resolved, latents = clip_latents(slot, request)
    low_slot = slot.experts["low_noise"].blocks[0].attn1.to_q.lora_B["clip"].weight
    assert torch.count_nonzero(low_slot) == 0
    reference = hand_merged(folders["t2v-a14b"], T2V, {"high_noise": [(high, 0.9)]})
    torch.testing.assert_close(latents, reference_latents(reference, resolved), **LATENTS)


# --- 3. swaps -------------------------------------------------------------------------------------


def test_swapping_a_then_b_then_none_gives_b_then_the_base_bit_for_bit(folders, base, loras):
    a = adapter("a", pair(loras, "style", "peft"), 0.8)
    b = adapter("b", pair(loras, "style", "comfyui"), 0.6)
    request = clip(seed=9, steps=4)
    with_a, with_b = (clip(seed=9, steps=4, adapters=(x,)) for x in (a, b))

    generator = slotted(folders["t2v-a14b"], T2V)
    assert generator.adapter_slot.swaps == 0
    empty = generator.generate(request)
    assert empty.adapter_swap_seconds is None and generator.adapter_slot.swaps == 0  # nothing to swap

    first = generator.generate(with_a)
    assert isinstance(first.adapter_swap_seconds, float) and generator.adapter_slot.swaps == 1
    again = generator.generate(with_a)
    assert again.adapter_swap_seconds is None and generator.adapter_slot.swaps == 1
    assert np.array_equal(first.frames, again.frames)

    second = generator.generate(with_b)
    assert isinstance(second.adapter_swap_seconds, float) and generator.adapter_slot.swaps == 2
    only_b = slotted(folders["t2v-a14b"], T2V).generate(with_b)
    assert np.array_equal(second.frames, only_b.frames)
    assert not np.array_equal(second.frames, first.frames)

    none = generator.generate(request)
    assert isinstance(none.adapter_swap_seconds, float) and generator.adapter_slot.swaps == 3
    base_frames = base.generate(request).frames
    assert np.array_equal(none.frames, base_frames) and np.array_equal(empty.frames, base_frames)
    assert generator.generate(request).adapter_swap_seconds is None and generator.adapter_slot.swaps == 3

    # The same name at a new scale is a new swap, and so are new bytes under that name (another digest).
    assert isinstance(generator.generate(with_a).adapter_swap_seconds, float)
    rescaled = adapter("a", pair(loras, "style", "peft"), 0.5)
    rewritten = adapter("a", pair(loras, "style", "musubi"), 0.5)
    assert rescaled.digest == a.digest and rewritten.digest != a.digest
    for changed in (rescaled, rewritten):
        swapped = generator.generate(clip(seed=9, steps=4, adapters=(changed,)))
        assert isinstance(swapped.adapter_swap_seconds, float)
    assert generator.adapter_slot.swaps == 6


def test_two_adapters_at_once_equal_the_sum_of_their_merged_deltas(folders, slot, loras):
    a, b = pair(loras, "style", "lightx2v"), pair(loras, "other", "musubi")
    request = clip(seed=2, steps=4, adapters=(adapter("a", a, 0.5), adapter("b", b, 1.2)))
    resolved, latents = clip_latents(slot, request)
    reference = hand_merged(
        folders["t2v-a14b"], T2V, {expert: [(a[expert], 0.5), (b[expert], 1.2)] for expert in a}
    )
    torch.testing.assert_close(latents, reference_latents(reference, resolved), **LATENTS)


def test_adapters_beyond_the_slot_rank_fail_at_prepare(slot, loras):
    three = tuple(
        adapter(name, pair(loras, role, layout))
        for name, role, layout in (("a", "style", "peft"), ("b", "other", "musubi"), ("c", "third", "peft"))
    )
    swaps = slot.adapter_slot.swaps
    with pytest.raises(AdapterError, match=r"need rank 12 together; the per-clip slot holds 8"):
        slot.prepare(clip(seed=1, steps=4, adapters=three))
    assert slot.adapter_slot.swaps == swaps  # refused before anything was swapped
    # A per-clip file with bias deltas cannot go into the slot either: refused, pointing at a recipe.
    distill = adapter("distill", pair(loras, "distill", "lightx2v"))
    with pytest.raises(AdapterError, match="bias deltas"):
        slot.prepare(clip(seed=1, steps=4, adapters=(distill,)))


def test_a_generator_without_a_slot_refuses_per_clip_adapters(base, loras):
    request = clip(seed=1, adapters=(adapter("a", pair(loras, "style", "peft")),))
    with pytest.raises(InvalidRequestError) as err:
        base.prepare(request)
    assert [problem.field for problem in err.value.problems] == ["adapters"]
    assert "adapters:" in str(err.value)


# --- 4. recipes -----------------------------------------------------------------------------------


def test_the_four_step_recipe_is_lightx2vs_plan():
    recipe = get_recipe(T2V, FOUR_STEP)
    assert (recipe.steps, recipe.guidance_scale, recipe.guidance_scale_2, recipe.flow_shift) == (
        4,
        1.0,
        1.0,
        5.0,
    )
    assert (recipe.scheduler, recipe.timesteps, recipe.switch_step) == ("euler", (1000, 750, 500, 250), 2)
    assert get_recipe(I2V, FOUR_STEP).fused_adapters == (("wan2.2-i2v-a14b-lightx2v-4step", 1.0),)


def test_four_step_recipe_runs_four_single_forwards_and_no_unconditional_pass(fused):
    request = clip(seed=4, recipe=FOUR_STEP)
    prepared = fused.prepare(request)
    assert prepared.negative is None and prepared.request.steps == 4
    calls, handles = record_forwards(fused)
    try:
        video = fused.render(prepared)
    finally:
        for handle in handles:
            handle.remove()
    assert video.expert_calls == {"high_noise": 2, "low_noise": 2}
    assert [(name, batch) for name, batch, _ in calls] == [
        ("high_noise", 1),
        ("high_noise", 1),  # the switch is at step 2
        ("low_noise", 1),
        ("low_noise", 1),
    ]
    # 1000/750/500/250 shifted by 5: t' = 5t / (1 + 4t) on the 0..1 scale.
    assert [t for _, _, t in calls] == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-3)


def test_recipe_requests_are_checked(base, fused):
    def refused_fields(generator: WanGenerator, request: GenerationRequest) -> list[str]:
        with pytest.raises(InvalidRequestError) as err:
            generator.prepare(request)
        return [problem.field for problem in err.value.problems]

    assert refused_fields(fused, clip(seed=1, recipe=FOUR_STEP, steps=8)) == ["steps"]
    assert refused_fields(fused, clip(seed=1, recipe="turbo-2step")) == ["recipe"]
    # The recipe needs its adapters fused at load; a generator holding them serves nothing else.
    assert refused_fields(base, clip(seed=1, recipe=FOUR_STEP)) == ["recipe"]
    assert refused_fields(fused, clip(seed=1)) == ["recipe"]
    assert [recipe.name for recipe in base.recipes] == ["standard"]


def test_guidance_one_on_the_standard_recipe_runs_one_forward_per_step(base):
    unguided = clip(seed=3, steps=4, guidance_scale=1.0, guidance_scale_2=1.0)
    assert base.prepare(unguided).negative is None
    video = base.generate(unguided)
    assert video.expert_calls == {"high_noise": 3, "low_noise": 1}  # shift 12: 3 steps above the boundary
    # Guidance 1 on one expert only: that expert's steps take one forward, the other's two.
    mixed = base.generate(clip(seed=3, steps=4, guidance_scale=1.0))
    assert mixed.expert_calls == {"high_noise": 3, "low_noise": 2}


# --- 5. I2V and TI2V-5B ---------------------------------------------------------------------------


def test_i2v_with_a_fused_pair_runs_the_four_step_recipe(folders, tmp_path):
    plain = DiffusionPipeline.from_pretrained(folders["i2v-a14b"], dtype=torch.float32)
    files = {
        expert: write_lora(
            getattr(plain, COMPONENT[expert]), tmp_path / f"{expert}.safetensors", "lightx2v", seed=seed
        )
        for expert, seed in (("high_noise", 31), ("low_noise", 32))
    }
    name, scale = get_recipe(I2V, FOUR_STEP).fused_adapters[0]
    generator = load(folders["i2v-a14b"], I2V, fused_adapters=[adapter(name, files, scale)])
    request = clip(prompt="a lamp", seed=1, recipe=FOUR_STEP, image=product_image())
    resolved, latents = clip_latents(generator, request)
    reference = hand_merged(folders["i2v-a14b"], I2V, {e: [(lora, 1.0)] for e, lora in files.items()})
    torch.testing.assert_close(latents, reference_latents(reference, resolved), **LATENTS)
    video = generator.generate(request)
    assert video.expert_calls == {"high_noise": 2, "low_noise": 2}
    assert video.frames.shape == (5, 64, 64, 3)


def test_ti2v_takes_a_per_clip_adapter_for_its_one_expert(folders, tmp_path):
    plain = DiffusionPipeline.from_pretrained(folders["ti2v-5b"], dtype=torch.float32)
    lora = write_lora(plain.transformer, tmp_path / "dense.safetensors", "comfyui", seed=41)
    generator = slotted(folders["ti2v-5b"], TI2V)
    assert list(generator.experts) == ["dense"] and [r.name for r in generator.recipes] == ["standard"]
    # TI2V's tiny sizes are 96x64 and 64x96.
    with_image = clip(
        prompt="a bottle",
        seed=5,
        steps=2,
        width=96,
        image=product_image(),
        adapters=(adapter("d", {"dense": lora}, 0.8),),
    )
    reference = hand_merged(folders["ti2v-5b"], TI2V, {"dense": [(lora, 0.8)]})
    for request in (
        with_image,
        replace(with_image, image=None),
    ):
        resolved, latents = clip_latents(generator, request)
        torch.testing.assert_close(latents, reference_latents(reference, resolved), **LATENTS)
    video = generator.generate(with_image)
    assert video.expert_calls == {"dense": 4} and video.frames.shape == (5, 64, 96, 3)
    # A file keyed for an A14B expert is not for a dense model.
    wrong = AdapterWeights("w", (("high_noise", str(lora.path)),), 1.0)
    with pytest.raises(InvalidRequestError, match="adapters"):
        generator.prepare(replace(with_image, adapters=(wrong,)))
