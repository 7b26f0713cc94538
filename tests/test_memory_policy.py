"""Where the weights live: the memory plan at real sizes, and A14B's experts sharing one slot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline
from wan_engine.generator import EngineOptions
from wan_engine.memory import BlockRing, MemoryPlan, block_bytes, plan_memory, weight_bytes

# What torch reports as total_memory on each GPU.
H200_BYTES = 150_110_011_392
H100_BYTES = 85_029_158_912
L40S_BYTES = 47_697_362_944
# The share of a 24 GB card (L4, A10G, RTX 4090) a process gets to use.
SMALL_CARD_BYTES = 22 * 2**30


def real_size_weights(family: str) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """The experts and text encoder of ``family`` at real size, in bf16 on the meta device: sizes only."""
    arch = get_model_spec(family).architecture
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            experts = [
                WanTransformer3DModel(**arch.transformer)
                for _ in range(2 if get_model_spec(family).is_moe else 1)
            ]
            text_encoder = UMT5EncoderModel(UMT5Config(**arch.text_encoder))
    finally:
        torch.set_default_dtype(torch.float32)
    return experts, text_encoder


def test_memory_plan_at_real_sizes():
    experts, text_encoder = real_size_weights("t2v-a14b")
    assert 28e9 < weight_bytes(experts[:1]) < 29e9 and 11e9 < weight_bytes([text_encoder]) < 12e9
    plans = {
        gpu: plan_memory(experts, text_encoder, budget)
        for gpu, budget in (("H200", H200_BYTES), ("H100", H100_BYTES), ("L40S", L40S_BYTES), ("CPU", None))
    }
    assert plans == {
        "H200": MemoryPlan(stream_experts=False, offload_text_encoder=False),
        "H100": MemoryPlan(stream_experts=False, offload_text_encoder=True),
        "L40S": MemoryPlan(stream_experts=True, offload_text_encoder=True),
        "CPU": MemoryPlan(stream_experts=False, offload_text_encoder=False),
    }
    # Settings override the choice.
    forced = plan_memory(experts, text_encoder, H200_BYTES, stream_experts=True, offload_text_encoder=True)
    assert forced == MemoryPlan(stream_experts=True, offload_text_encoder=True)
    # TI2V-5B is one dense model: nothing to stream, and it fits a 48 GB GPU with its text encoder.
    dense, dense_encoder = real_size_weights("ti2v-5b")
    assert plan_memory(dense, dense_encoder, L40S_BYTES) == MemoryPlan(False, False)
    with pytest.raises(ValueError, match="two experts"):
        plan_memory(dense, dense_encoder, L40S_BYTES, stream_experts=True)


def plan_for(family: str, budget: int | None, **overrides) -> MemoryPlan:
    """The plan the generator makes for ``family`` at real size: its largest clip's decode counted."""
    spec = get_model_spec(family)
    experts, text_encoder = real_size_weights(family)
    largest = max(width * height for width, height in spec.sizes)
    return plan_memory(
        experts, text_encoder, budget, decode_bytes=spec.vae_decode_bytes_per_pixel * largest, **overrides
    )


def test_small_cards_stream_blocks_and_tile_the_decode_only_when_it_would_not_fit():
    ring = MemoryPlan(stream_experts=False, offload_text_encoder=True, stream_blocks=True)
    for family in ("t2v-a14b", "i2v-a14b"):
        # One A14B expert alone (28.6 GB) is more than a 24 GB card: every block streams through the ring.
        assert plan_for(family, SMALL_CARD_BYTES) == ring
        # The tiers above are unchanged by the decode counted in.
        assert plan_for(family, H100_BYTES) == MemoryPlan(stream_experts=False, offload_text_encoder=True)
        assert plan_for(family, L40S_BYTES) == MemoryPlan(stream_experts=True, offload_text_encoder=True)
    # TI2V-5B's 10 GB would fit 22 GiB, but not with its 720p decode (~14 GB) beside it: the ring frees it.
    assert plan_for("ti2v-5b", SMALL_CARD_BYTES) == ring
    assert plan_for("ti2v-5b", L40S_BYTES) == MemoryPlan(stream_experts=False, offload_text_encoder=False)
    # Below what even the ring leaves room for, the decode is tiled.
    assert plan_for("ti2v-5b", 12 * 2**30) == MemoryPlan(False, True, stream_blocks=True, tile_decode=True)
    # Overrides: block streaming on a big GPU, and never on a small one (then the decode is tiled).
    assert plan_for("t2v-a14b", H200_BYTES, stream_blocks=True).stream_blocks
    assert plan_for("ti2v-5b", SMALL_CARD_BYTES, stream_blocks=False) == MemoryPlan(
        False, True, stream_blocks=False, tile_decode=True
    )
    with pytest.raises(ValueError, match="choose one"):
        plan_for("t2v-a14b", None, stream_blocks=True, stream_experts=True)
    # What the ring leaves on the GPU: embedders and output layers (under 1 % of an expert) and two blocks.
    experts, _ = real_size_weights("t2v-a14b")
    assert block_bytes(experts) > 0.98 * weight_bytes(experts)


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    return save_random_pipeline(get_model_spec("t2v-a14b", "tiny"), tmp_path_factory.mktemp("tiny-models"))


def load(folder, family: str = "t2v-a14b", **options) -> WanGenerator:
    spec = get_model_spec(family, "tiny")
    return WanGenerator.from_pretrained(folder, spec, device="cpu", options=EngineOptions(**options))


def load_ringed(folder, family: str = "t2v-a14b", **options) -> WanGenerator:
    """Blocks through a ring; the rest (embedders, output layers) realigned as in :func:`load_resident`."""
    generator = load(folder, family, block_streaming=True, **options)
    for expert in generator.experts.values():
        for name, parameter in expert.named_parameters():
            if not name.startswith("blocks."):
                parameter.data = parameter.data.clone()
    return generator


def load_resident(folder, family: str = "t2v-a14b", **options) -> WanGenerator:
    """The reference: experts resident, their weights in fresh allocations as the slot's are.

    from_pretrained's weights are views into the file at any alignment, and CPU matmul kernels round
    differently at other alignments (by 1 in a few pixels here): equal weights must also sit alike.
    """
    generator = load(folder, family, **options)
    for expert in generator.experts.values():
        for parameter in expert.parameters():
            if type(parameter.data) is torch.Tensor:  # 8-bit weights are fresh tensors already
                parameter.data = parameter.data.clone()
    return generator


@pytest.mark.parametrize("batch_guidance", [True, False])
def test_streamed_experts_share_one_slot_and_give_the_same_frames(t2v_folder, batch_guidance):
    resident = load_resident(t2v_folder, batch_guidance=batch_guidance)
    streamed = load(t2v_folder, batch_guidance=batch_guidance, expert_streaming=True)
    assert resident.memory_plan.stream_experts is False and streamed.expert_slot is not None
    high, low = (dict(streamed.experts[name].named_parameters()) for name in ("high_noise", "low_noise"))
    assert all(high[key].data_ptr() == low[key].data_ptr() for key in high)  # one set of weights in memory
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=11, steps=12)
    for _ in range(2):  # the second clip starts on the expert streamed back in during the first's last step
        ours, reference = streamed.generate(request), resident.generate(request)
        assert np.array_equal(ours.frames, reference.frames)
        assert ours.expert_calls == reference.expert_calls
        assert ours.expert_calls["high_noise"] > 0 and ours.expert_calls["low_noise"] > 0
    # Every switch was streamed during the previous forward: none was a whole copy before its expert ran.
    assert streamed.expert_slot.unstreamed_switches == 0
    assert streamed.expert_slot.holder == "high_noise"  # ready for the next clip


def test_an_expert_run_out_of_turn_is_copied_in_whole(t2v_folder):
    resident = load_resident(t2v_folder)
    streamed = load(t2v_folder, expert_streaming=True)
    slot = streamed.expert_slot
    torch.manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 5, 8, 12),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 512, resident.pipeline.text_encoder.config.d_model),
        "return_dict": False,
    }
    with torch.inference_mode():
        for runs, name in enumerate(("low_noise", "high_noise", "low_noise"), start=1):
            ours, reference = streamed.experts[name](**inputs)[0], resident.experts[name](**inputs)[0]
            assert torch.equal(ours, reference), name
            assert slot.unstreamed_switches == runs, name  # copied in whole before it ran


def test_a_resident_generator_streams_its_experts_on_request(t2v_folder):
    # As bench/engine's streaming check does: resident first, then the same weights streamed.
    generator = load_resident(t2v_folder)
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=5, steps=6)
    resident = generator.generate(request)
    slot = generator.stream_experts()
    assert generator.expert_slot is slot and generator.memory_plan.stream_experts
    assert np.array_equal(generator.generate(request).frames, resident.frames)
    assert slot.unstreamed_switches == 0
    slot.streaming = False  # the switch to the low-noise expert is a whole copy before it runs
    assert np.array_equal(generator.generate(request).frames, resident.frames)
    assert slot.unstreamed_switches == 1


def test_text_encoder_between_clips_lives_in_host_copies(t2v_folder):
    resident = load_resident(t2v_folder)
    offloaded = load(t2v_folder, text_encoder_offload=True, expert_streaming=True)
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=4, steps=6)
    assert np.array_equal(offloaded.generate(request).frames, resident.generate(request).frames)
    host = offloaded.text_encoder_host.host.tensors
    encoder = offloaded.pipeline.text_encoder
    assert all(p.data_ptr() == host[name].data_ptr() for name, p in encoder.named_parameters())


def test_fp8_and_expert_streaming_are_refused_together(t2v_folder):
    # FP8 matmuls quantize on the GPU, where streamed weights are not: the combination fails at load.
    for tier in ("expert_streaming", "block_streaming"):
        with pytest.raises(ValueError, match="keeps in host memory"):
            load(t2v_folder, fp8_matmuls=True, **{tier: True})


@pytest.fixture(scope="module")
def ti2v_folder(tmp_path_factory):
    return save_random_pipeline(get_model_spec("ti2v-5b", "tiny"), tmp_path_factory.mktemp("tiny-ti2v"))


@pytest.mark.parametrize("batch_guidance", [True, False])
def test_blocks_streamed_through_a_ring_give_the_resident_frames(t2v_folder, batch_guidance):
    resident = load_resident(t2v_folder, batch_guidance=batch_guidance)
    ringed = load_ringed(t2v_folder, batch_guidance=batch_guidance)
    ring = ringed.block_ring
    assert ringed.memory_plan.tier == "block-ring" and ringed.expert_slot is None
    # Block i of both experts sits in the ring's set i % 2: one set of GPU tensors for all of them.
    high, low = (ringed.experts[name].blocks for name in ("high_noise", "low_noise"))
    for index, (block_high, block_low) in enumerate(zip(high, low, strict=True)):
        ring_set = ring.ring[index % ring.slots]
        for (key, ours), (_, theirs) in zip(
            block_high.named_parameters(), block_low.named_parameters(), strict=True
        ):
            assert ours.data_ptr() == theirs.data_ptr() == ring_set[key].data_ptr()
    assert ring.host_bytes >= block_bytes(resident.experts.values())
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=11, steps=12)
    for _ in range(2):  # the second clip's first blocks were prefetched at the end of the first
        ours, reference = ringed.generate(request), resident.generate(request)
        assert np.array_equal(ours.frames, reference.frames)
        assert ours.expert_calls == reference.expert_calls
    # Only the very first forward's blocks were copied as they were needed: the rest, across the expert
    # switch and into the next clip, were in the ring before their turn.
    assert ring.unprefetched_blocks == ring.slots


def test_a_ring_of_one_block_without_the_schedule_still_gives_the_resident_frames(t2v_folder):
    # Nobody tells this ring which expert comes next: at each switch it guessed wrong and copied as needed.
    resident = load_resident(t2v_folder)
    generator = load_resident(t2v_folder)
    ring = BlockRing(generator.experts, generator.device, slots=1)
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=2, steps=8)
    assert np.array_equal(generator.generate(request).frames, resident.generate(request).frames)
    assert ring.unprefetched_blocks > 1
    with pytest.raises(ValueError, match="too many or none"):
        BlockRing(resident.experts, resident.device, slots=3)


def test_a_dense_model_streams_its_blocks_too(ti2v_folder):
    resident, ringed = load_resident(ti2v_folder, "ti2v-5b"), load_ringed(ti2v_folder, "ti2v-5b")
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=7, steps=5)
    assert np.array_equal(ringed.generate(request).frames, resident.generate(request).frames)
    assert ringed.block_ring.unprefetched_blocks == ringed.block_ring.slots


def relative_frames_error(frames: np.ndarray, reference: np.ndarray) -> float:
    difference = frames.astype(np.float64) - reference
    return float(np.linalg.norm(difference) / np.linalg.norm(reference.astype(np.float64)))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_8bit_weights_halve_the_blocks_and_stream_like_the_rest(t2v_folder, kind):
    reference = load_resident(t2v_folder)
    quantized = load_resident(t2v_folder, weights_8bit=kind)
    assert quantized.options.mode == f"approximate:{kind}-weights"
    # The tiny model is float32: its blocks take under half the bytes (a quarter, plus scales and norms).
    assert block_bytes(quantized.experts.values()) < 0.5 * block_bytes(reference.experts.values())
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=3, steps=6)
    frames = quantized.generate(request).frames
    error = relative_frames_error(frames, reference.generate(request).frames)
    # Rounded weights: not the same frames, but near them: int8 keeps 8 bits of each weight, e4m3 4 (random
    # tiny weights amplify rounding: 3 % and 11 % here; bench.engine --memory-check measures real size).
    assert 0 < error < {"int8": 0.05, "fp8": 0.15}[kind]
    # Both streaming tiers move the 8-bit parts and give the 8-bit resident frames, bit for bit.
    streamed = [load_ringed(t2v_folder, weights_8bit=kind)]
    if kind == "int8":  # the same mechanism (a quantized weight moves as its parts): one kind is enough
        streamed.append(load(t2v_folder, weights_8bit=kind, expert_streaming=True))
    for generator in streamed:
        assert np.array_equal(generator.generate(request).frames, frames), generator.memory_plan.tier


def test_8bit_modes_refuse_what_cannot_run(t2v_folder):
    with pytest.raises(ValueError, match="choose one"):
        load(t2v_folder, fp8_matmuls=True, weights_8bit="int8")


def test_a_decode_out_of_gpu_memory_is_retried_in_tiles(t2v_folder, monkeypatch):
    import wan_engine.generator

    generator = load(t2v_folder)
    request = GenerationRequest(prompt="a red sneaker on a turntable", seed=1, steps=2)
    expected = generator.generate(request).frames
    whole_frame_decode = wan_engine.generator.decode_latents
    decodes = []

    def runs_out_untiled(vae, latents, options):
        decodes.append(vae.use_tiling)
        if not vae.use_tiling or len(decodes) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return whole_frame_decode(vae, latents, options)

    monkeypatch.setattr(wan_engine.generator, "decode_latents", runs_out_untiled)
    # The tiny frames are smaller than one tile: the tiled decode gives the same frames.
    assert np.array_equal(generator.generate(request).frames, expected)
    assert decodes == [False, True] and generator.memory_plan.tile_decode
    with pytest.raises(torch.OutOfMemoryError):  # out of memory in tiles too: nothing smaller to try
        generator.generate(request)
