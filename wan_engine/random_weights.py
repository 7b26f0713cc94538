"""Random-weight Wan2.2 pipelines built offline from a :class:`ModelSpec`'s architecture.

No model hub is reachable here, so tests use the ``tiny`` variants and benchmarks the
``full`` ones: the real diffusers classes with random weights from a fixed seed, saved
with ``save_pretrained`` so they are loaded exactly like real weights.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from wan_engine.specs import ModelSpec

_PIPELINE_CLASSES = {"WanPipeline": WanPipeline, "WanImageToVideoPipeline": WanImageToVideoPipeline}


def build_tokenizer(vocab_size: int) -> T5Tokenizer:
    """A SentencePiece-style unigram tokenizer made in memory (umT5's own needs the hub).

    Pieces are the special tokens, single characters and a few hundred common
    English words, padded with unused pieces up to the encoder's vocabulary size.
    """
    words = (
        "a an the of and with in on for to by at from product video shot studio light soft warm cool "
        "close up slow motion camera pan zoom rotating turntable background white black red blue green "
        "gold silver wood leather cotton glass metal new sale premium classic modern minimal elegant "
        "sneaker shoe bag watch lamp chair mug bottle jacket dress hat phone headphones table sofa"
    ).split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(f"<unused_{i}>", -100.0) for i in range(max(0, vocab_size - len(pieces)))]
    if len(pieces) > vocab_size:
        pieces = pieces[:vocab_size]
    return T5Tokenizer(
        vocab=pieces, unk_id=2, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


def build_random_pipeline(spec: ModelSpec, seed: int = 0) -> DiffusionPipeline:
    """The float32 diffusers pipeline of ``spec`` with random weights drawn from ``seed``.

    Cast it by saving and loading with ``torch_dtype``: ``from_pretrained`` keeps the
    transformer's norms and embeddings in float32 where a plain ``.to()`` would not.
    """
    arch = spec.architecture
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(**arch.text_encoder))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**arch.vae)
    transformers = []
    for expert in range(2 if spec.is_moe else 1):
        torch.manual_seed(seed + 2 + expert)
        transformers.append(WanTransformer3DModel(**arch.transformer))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.flow_shift
    )
    components = {
        "tokenizer": build_tokenizer(arch.text_encoder["vocab_size"]),
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
        "transformer": transformers[0],
        "transformer_2": transformers[1] if spec.is_moe else None,
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.expand_timesteps,
    }
    pipeline_class = _PIPELINE_CLASSES[spec.pipeline_class]
    if pipeline_class is WanImageToVideoPipeline:
        # Wan2.2 I2V conditions on the encoded first frame only: no CLIP image encoder.
        components |= {"image_encoder": None, "image_processor": None}
    return pipeline_class(**components)


def save_random_pipeline(spec: ModelSpec, out_dir: Path, seed: int = 0) -> Path:
    """Build ``spec`` with random weights and save it as a diffusers folder ``out_dir/spec.folder``."""
    folder = Path(out_dir) / spec.folder
    build_random_pipeline(spec, seed).save_pretrained(folder)
    return folder


def random_lora_state_dict(
    spec: ModelSpec, rank: int, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """A random rank-``rank`` LoRA for one of ``spec``'s transformers, in diffusers' (PEFT) layout, on the
    layers published Wan LoRAs train (``wan_engine.lora.SLOT_TARGETS`` of every block): the stand-in for
    a distillation or brand LoRA where none can be downloaded, at any size."""
    from wan_engine.lora import SLOT_TARGETS

    arch = spec.architecture.transformer
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    shapes = dict.fromkeys(SLOT_TARGETS, (width, width))  # (in, out)
    shapes["ffn.net.0.proj"] = (width, arch["ffn_dim"])
    shapes["ffn.net.2"] = (arch["ffn_dim"], width)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(arch["num_layers"]):
        for target, (fan_in, fan_out) in shapes.items():
            prefix = f"transformer.blocks.{block}.{target}"
            state[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) * std).to(
                dtype
            )
            state[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * std).to(
                dtype
            )
    return state


def save_random_lora(spec: ModelSpec, path: Path, rank: int = 4, seed: int = 0) -> Path:
    """:func:`random_lora_state_dict` saved as a ``.safetensors`` file at ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_lora_state_dict(spec, rank, seed), str(path))
    return path
