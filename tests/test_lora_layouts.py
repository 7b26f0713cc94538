"""Wan LoRAs in every key layout diffusers reads change the tiny transformers exactly as merged by hand.

Each test writes a random LoRA with :mod:`tests.lora_files` (PEFT/diffusers keys, the
LightX2V/Lightning ``diffusion_model.`` keys with ``lora_down``/``lora_up``/``alpha``,
the ComfyUI variant with ``lora_A``/``lora_B``, kohya/musubi ``lora_unet_`` keys), loads
it with the pipeline's ``load_lora_weights`` and compares the transformer's output with
that of a copy whose linear weights got ``scale * alpha / rank * up @ down`` added by hand.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft.tuners.tuners_utils import BaseTunerLayer

from tests.lora_files import LAYOUTS, lora_targets, merged_copy, read_adapter_metadata, write_lora
from wan_engine.random_weights import build_random_pipeline
from wan_engine.specs import get_model_spec

# float32 on CPU: PEFT's base(x) + B(A(x)) * s and the merged (W + s*B@A) x differ by rounding only.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _pipeline(family: str = "t2v-a14b"):
    return build_random_pipeline(get_model_spec(family, "tiny"))


def _output(transformer: WanTransformer3DModel, image_tokens: bool = False) -> torch.Tensor:
    """The transformer's output for one fixed random input (2 latent frames of 4x4, 8 text tokens)."""
    generator = torch.Generator().manual_seed(1234)
    config = transformer.config
    kwargs = {}
    latents = torch.randn(1, config.in_channels, 2, 4, 4, generator=generator)
    text = torch.randn(1, 8, config.text_dim, generator=generator)
    if image_tokens:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 4, config.image_dim, generator=generator)
    with torch.no_grad():
        return transformer(
            hidden_states=latents,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=text,
            return_dict=False,
            **kwargs,
        )[0]


def _has_lora_layers(transformer: WanTransformer3DModel) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in transformer.modules())


def test_each_layout_writes_the_keys_its_converter_reads(tmp_path):
    transformer = _pipeline().transformer
    expected = {
        "peft": "transformer.blocks.1.attn2.to_out.0.lora_A.weight",
        "lightx2v": "diffusion_model.blocks.1.cross_attn.o.lora_down.weight",
        "comfyui": "diffusion_model.blocks.1.cross_attn.o.lora_A.weight",
        "musubi": "lora_unet_blocks_1_cross_attn_o.lora_down.weight",
    }
    for layout in LAYOUTS:
        lora = write_lora(transformer, tmp_path / f"{layout}.safetensors", layout)
        keys = lora.keys()
        assert expected[layout] in keys
        # 10 linear layers in each of the 2 blocks, a down and an up matrix each (+ alpha outside peft).
        assert len(keys) == len(lora_targets(transformer)) * (2 if layout == "peft" else 3)
        assert set(lora.weight_deltas) == set(lora_targets(transformer))
    # peft keeps alpha in the header, written by diffusers' save_lora_weights, not in the tensors.
    metadata = read_adapter_metadata(tmp_path / "peft.safetensors")
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 2.0
    assert read_adapter_metadata(tmp_path / "lightx2v.safetensors") is None


# (layout, write_lora options): every layout with alpha != rank; the layouts where alpha is
# optional without it; the diff_b biases and dropped norm diffs LightX2V files carry; alpha > rank.
CASES = [
    *[(layout, {}) for layout in LAYOUTS],
    ("peft", {"alpha": None}),
    ("lightx2v", {"alpha": None}),
    ("comfyui", {"alpha": None}),
    ("lightx2v", {"bias": True, "norm_diffs": True}),
    ("comfyui", {"bias": True, "alpha": None}),
    ("peft", {"bias": True}),
    ("musubi", {"rank": 2, "alpha": 16.0}),
]


@pytest.mark.parametrize(("layout", "options"), CASES, ids=[f"{lay}-{opt}" for lay, opt in CASES])
def test_loaded_lora_equals_the_hand_merged_delta_at_full_and_half_scale(tmp_path, layout, options):
    pipe = _pipeline()
    lora = write_lora(pipe.transformer, tmp_path / "lora.safetensors", layout, seed=7, **options)
    full, half = merged_copy(pipe.transformer, lora, 1.0), merged_copy(pipe.transformer, lora, 0.5)
    base_output = _output(pipe.transformer)
    low_noise_output = _output(pipe.transformer_2)

    pipe.load_lora_weights(str(lora.path), adapter_name="high")

    assert pipe.get_list_adapters() == {"transformer": ["high"]}
    output = _output(pipe.transformer)
    assert (output - base_output).abs().max() > 0.05  # the LoRA does change the output
    torch.testing.assert_close(output, _output(full), **TOLERANCE)
    pipe.set_adapters("high", 0.5)
    torch.testing.assert_close(_output(pipe.transformer), _output(half), **TOLERANCE)
    # Without load_into_transformer_2, the low-noise expert is left alone.
    assert not _has_lora_layers(pipe.transformer_2)
    torch.testing.assert_close(_output(pipe.transformer_2), low_noise_output, rtol=0, atol=0)
    if lora.dropped_keys:  # norm diffs are in the file but diffusers drops them
        assert all(".norm" in key for key in lora.dropped_keys)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_into_transformer_2_loads_into_the_low_noise_expert_only(tmp_path, layout):
    pipe = _pipeline()
    high = write_lora(pipe.transformer, tmp_path / "high.safetensors", layout, seed=1)
    low = write_lora(pipe.transformer_2, tmp_path / "low.safetensors", layout, seed=2, rank=8, alpha=4.0)
    references = {
        (expert, scale): merged_copy(getattr(pipe, expert), lora, scale)
        for expert, lora in (("transformer", high), ("transformer_2", low))
        for scale in (1.0, 0.5, 0.25)
    }
    high_noise_output, low_noise_output = _output(pipe.transformer), _output(pipe.transformer_2)

    def matches(expert: str, scale: float) -> None:
        expected = _output(references[expert, scale])
        torch.testing.assert_close(_output(getattr(pipe, expert)), expected, **TOLERANCE)

    pipe.load_lora_weights(str(low.path), adapter_name="low", load_into_transformer_2=True)

    assert pipe.get_list_adapters() == {"transformer_2": ["low"]}
    assert not _has_lora_layers(pipe.transformer)
    torch.testing.assert_close(_output(pipe.transformer), high_noise_output, rtol=0, atol=0)
    matches("transformer_2", 1.0)

    # Each expert needs its own call: the second file goes to `transformer` only.
    pipe.load_lora_weights(str(high.path), adapter_name="high")
    assert pipe.get_list_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}
    matches("transformer", 1.0)
    matches("transformer_2", 1.0)

    # One set_adapters call scales each expert's adapter, named together...
    pipe.set_adapters(["high", "low"], [0.5, 0.25])
    matches("transformer", 0.5)
    matches("transformer_2", 0.25)
    # ...while naming one adapter deactivates the other expert's: transformer_2 is back to its base weights.
    pipe.set_adapters("high", 0.5)
    matches("transformer", 0.5)
    torch.testing.assert_close(_output(pipe.transformer_2), low_noise_output, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_i2v_experts_take_t2v_shaped_loras_unchanged(tmp_path, layout):
    """Wan2.2 I2V-A14B has no CLIP image branch (``image_dim`` None), so nothing is expanded."""
    pipe = _pipeline("i2v-a14b")
    assert pipe.transformer.config.in_channels == 36
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert transformer.config.image_dim is None
        assert not any(name.endswith("add_k_proj") for name, _ in transformer.named_modules())
    high = write_lora(pipe.transformer, tmp_path / "high.safetensors", layout, seed=3)
    low = write_lora(pipe.transformer_2, tmp_path / "low.safetensors", layout, seed=4)
    high_ref, low_ref = merged_copy(pipe.transformer, high), merged_copy(pipe.transformer_2, low)

    pipe.load_lora_weights(str(high.path), adapter_name="high")
    pipe.load_lora_weights(str(low.path), adapter_name="low", load_into_transformer_2=True)

    torch.testing.assert_close(_output(pipe.transformer), _output(high_ref), **TOLERANCE)
    torch.testing.assert_close(_output(pipe.transformer_2), _output(low_ref), **TOLERANCE)


def test_a_wan21_style_image_branch_gets_zero_loras_added(tmp_path):
    """With ``image_dim`` set (Wan2.1 I2V), ``_maybe_expand_t2v_lora_for_i2v`` pads a T2V LoRA.

    It adds zero ``attn2.add_k_proj``/``add_v_proj`` LoRAs for the image keys, which
    leave the output as the hand merge of the T2V deltas alone.
    """
    spec = get_model_spec("i2v-a14b", "tiny")
    pipe = _pipeline("i2v-a14b")
    inner_dim = (
        spec.architecture.transformer["num_attention_heads"]
        * spec.architecture.transformer["attention_head_dim"]
    )
    torch.manual_seed(5)
    pipe.register_modules(
        transformer=WanTransformer3DModel(
            **spec.architecture.transformer, image_dim=16, added_kv_proj_dim=inner_dim
        )
    )
    lora = write_lora(pipe.transformer, tmp_path / "t2v.safetensors", "lightx2v", seed=6)
    reference = merged_copy(pipe.transformer, lora)

    pipe.load_lora_weights(str(lora.path), adapter_name="t2v")

    add_k = pipe.transformer.blocks[0].attn2.add_k_proj
    assert isinstance(add_k, BaseTunerLayer)
    assert torch.count_nonzero(add_k.lora_B["t2v"].weight) == 0
    torch.testing.assert_close(
        _output(pipe.transformer, image_tokens=True), _output(reference, image_tokens=True), **TOLERANCE
    )


def test_musubi_files_always_carry_alpha(tmp_path):
    transformer = _pipeline().transformer
    with pytest.raises(ValueError, match="alpha"):
        write_lora(transformer, tmp_path / "x.safetensors", "musubi", alpha=None)
