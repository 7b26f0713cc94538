"""Where the weights live: the memory plan at real sizes, and A14B's experts sharing one slot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline
from wan_engine.generator import EngineOptions
from wan_engine.memory import MemoryPlan, plan_memory, weight_bytes

# What torch reports as total_memory on each GPU.
H200_BYTES = 150_110_011_392
H100_BYTES = 85_029_158_912
L40S_BYTES = 47_697_362_944


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


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    return save_random_pipeline(get_model_spec("t2v-a14b", "tiny"), tmp_path_factory.mktemp("tiny-models"))


def load(folder, **options) -> WanGenerator:
    spec = get_model_spec("t2v-a14b", "tiny")
    return WanGenerator.from_pretrained(folder, spec, device="cpu", options=EngineOptions(**options))


def load_resident(folder, **options) -> WanGenerator:
    """The reference: experts resident, their weights in fresh allocations as the slot's are.

    from_pretrained's weights are views into the file at any alignment, and CPU matmul kernels round
    differently at other alignments (by 1 in a few pixels here): equal weights must also sit alike.
    """
    generator = load(folder, **options)
    for expert in generator.experts.values():
        for parameter in expert.parameters():
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
    # FP8 rewrites the weights the slot copies in: the combination fails at load, not mid-clip.
    with pytest.raises(ValueError, match="cannot be combined with expert streaming"):
        load(t2v_folder, expert_streaming=True, fp8_matmuls=True)
