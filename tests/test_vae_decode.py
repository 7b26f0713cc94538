"""wan_engine.vae: the faster decode gives diffusers' frames, on the tiny VAEs of both architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline
from wan_engine.generator import EngineOptions
from wan_engine.vae import FusedRMSNorm, VaeDecodeOptions, decode_latents, prepare_vae

# The 2.1 VAE (A14B) and the 2.2 VAE (TI2V-5B: patchified, residual up blocks).
FAMILIES = ("t2v-a14b", "ti2v-5b")


def tiny_vae(family: str) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**get_model_spec(family, "tiny").architecture.vae).eval()


def final_latents(vae: AutoencoderKLWan, latent_frames: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, vae.config.z_dim, latent_frames, 4, 6, generator=generator)


@torch.inference_mode()
def stock_decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    return decode_latents(vae, latents, VaeDecodeOptions())


@pytest.mark.parametrize("family", FAMILIES)
def test_one_latent_frame_per_call_is_diffusers_decode_bit_for_bit(family):
    vae = tiny_vae(family)
    latents = final_latents(vae)
    stock = stock_decode(vae, latents)
    with torch.inference_mode():
        ours = decode_latents(vae, latents, VaeDecodeOptions(autotune=True))  # our loop, one frame a call
    assert ours.shape == stock.shape and ours.shape[2] == 1 + 4 * (latents.shape[2] - 1)
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("frames_per_call", [2, 3, 5])
def test_several_latent_frames_per_call_give_the_same_video(family, frames_per_call):
    vae = tiny_vae(family)
    latents = final_latents(vae)  # 6 latent frames: the first alone, then chunks (5: all the rest at once)
    stock = stock_decode(vae, latents)
    with torch.inference_mode():
        ours = decode_latents(vae, latents, VaeDecodeOptions(latent_frames_per_call=frames_per_call))
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    # Chunking must not leave the causal cache behind: a second decode gives the same again.
    with torch.inference_mode():
        again = decode_latents(vae, latents, VaeDecodeOptions(latent_frames_per_call=frames_per_call))
    assert torch.equal(again, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_last_and_fused_norms_give_the_same_video(family):
    vae = tiny_vae(family)
    latents = final_latents(vae)
    stock = stock_decode(vae, latents)
    options = VaeDecodeOptions(latent_frames_per_call=2, channels_last=True, fused_norm=True)
    norms = sum(isinstance(m, WanRMS_norm) for m in vae.decoder.modules())
    prepare_vae(vae, options)
    assert sum(isinstance(m, FusedRMSNorm) for m in vae.decoder.modules()) == norms > 0
    assert not any(isinstance(m, WanRMS_norm) for m in vae.decoder.modules())
    conv = next(m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        ours = decode_latents(vae, latents, options)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)


def test_options_are_checked_and_labelled():
    with pytest.raises(ValueError, match="latent_frames_per_call"):
        VaeDecodeOptions(latent_frames_per_call=0)
    assert VaeDecodeOptions().label == "stock"
    assert VaeDecodeOptions(4, autotune=True, channels_last=True).label == "frames-4+autotune+channels-last"


def test_a_generator_with_the_fast_decode_makes_the_default_frames(tmp_path):
    spec = get_model_spec("ti2v-5b", "tiny")
    folder = save_random_pipeline(spec, tmp_path)
    request = GenerationRequest(prompt="a red kettle on a table", seed=7, steps=2)
    default = WanGenerator.from_pretrained(folder, spec, device="cpu")
    assert default.vae_decode == VaeDecodeOptions()  # a CPU decodes as diffusers does
    fast = WanGenerator.from_pretrained(
        folder,
        spec,
        device="cpu",
        options=EngineOptions(
            vae_decode=VaeDecodeOptions(latent_frames_per_call=4, channels_last=True, fused_norm=True)
        ),
    )
    expected, frames = default.generate(request).frames, fast.generate(request).frames
    assert frames.shape == expected.shape
    # uint8 frames: float rounding may move a value across a rounding boundary, by one level at most.
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
