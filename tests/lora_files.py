"""Tiny random LoRA files for a Wan transformer, in each key layout diffusers' Wan loader reads.

Published Wan LoRAs come in several layouts: diffusers/PEFT training scripts save
``transformer.blocks.N.attn1.to_q.lora_A.weight``; the LightX2V and Wan2.2-Lightning
distill LoRAs use the original Wan module names under ``diffusion_model.`` with
``lora_down``/``lora_up``/``alpha`` (and ``diff``/``diff_b`` for full deltas);
ComfyUI-side exports of the same names use ``lora_A``/``lora_B``; kohya's
musubi-tuner writes ``lora_unet_blocks_N_self_attn_q.lora_down.weight``.
``WanLoraLoaderMixin.lora_state_dict`` converts the last three to the first
(``_convert_non_diffusers_wan_lora_to_diffusers`` for ``diffusion_model.`` keys,
``_convert_musubi_wan_lora_to_diffusers`` for ``lora_unet_`` keys) and folds each
module's ``alpha / rank`` into ``lora_A``/``lora_B``.

Real LoRAs are gigabytes and the hub is out of reach, so the tests write small random
ones for the tiny transformers, and keep the weight delta each one *should* make, so
that a test can merge it by hand and compare with what diffusers loaded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file

Layout = Literal["peft", "lightx2v", "comfyui", "musubi"]
LAYOUTS: tuple[Layout, ...] = ("peft", "lightx2v", "comfyui", "musubi")

# The linear layers the published Wan LoRAs train, in every block: diffusers' name
# under ``blocks.N`` -> the original Wan name, as both converters map them.
BLOCK_TARGETS: dict[str, str] = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}

# Full-tensor diffs of norm weights that LightX2V LoRAs also carry (``norm3`` is the
# cross-attention input norm, ``norm_q``/``norm_k`` the RMS q/k norms). LightX2V's own
# loader adds them; diffusers' converter drops every ``*norm*.diff(_b)`` key.
_NORM_DIFFS: dict[str, str] = {
    "norm2": "norm3",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
}


@dataclass(frozen=True)
class LoraFile:
    """A LoRA written by :func:`write_lora` and the deltas diffusers should apply from it.

    ``weight_deltas``/``bias_deltas`` map a diffusers module name
    (``blocks.0.attn1.to_q``) to the change of its ``weight``/``bias`` at adapter
    scale 1; at scale ``s`` the change is ``s`` times that (PEFT scales the whole
    ``lora_B(lora_A(x))`` term, bias included). ``dropped_keys`` are keys in the file
    that diffusers' converter discards on purpose (norm diffs).
    """

    path: Path
    layout: Layout
    rank: int
    alpha: float | None
    weight_deltas: dict[str, torch.Tensor]
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped_keys: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        """The ``alpha / rank`` factor the loader applies; 1 when the file carries no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def keys(self) -> list[str]:
        """The tensor names stored in the file (to check a layout is what it says)."""
        with safe_open(str(self.path), framework="pt") as f:
            return list(f.keys())


def lora_targets(transformer: WanTransformer3DModel) -> list[str]:
    """Diffusers module names the published Wan LoRAs target in ``transformer``, block by block."""
    return [f"blocks.{i}.{name}" for i in range(len(transformer.blocks)) for name in BLOCK_TARGETS]


def _original_name(module_name: str) -> str:
    """``blocks.3.attn2.to_out.0`` -> ``blocks.3.cross_attn.o`` (the original Wan name)."""
    _, index, rest = module_name.split(".", 2)
    return f"blocks.{index}.{BLOCK_TARGETS[rest]}"


def _musubi_name(module_name: str) -> str:
    """``blocks.3.ffn.net.0.proj`` -> ``lora_unet_blocks_3_ffn_0`` (kohya/musubi naming)."""
    return "lora_unet_" + _original_name(module_name).replace(".", "_")


def write_lora(
    transformer: WanTransformer3DModel,
    path: Path,
    layout: Layout,
    *,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    bias: bool = False,
    norm_diffs: bool = False,
) -> LoraFile:
    """Write a random rank-``rank`` LoRA for ``transformer`` to ``path`` in ``layout``.

    ``alpha`` follows each layout's own convention, the one the loader applies:
    ``peft`` stores it as ``lora_alpha`` in the safetensors metadata written by
    ``save_lora_weights`` (no metadata: PEFT's default ``lora_alpha = r``, scale 1);
    ``lightx2v``/``comfyui`` store a scalar ``<module>.alpha`` per module, which the
    converter folds in as ``alpha / rank`` (no key: scale 1); ``musubi`` files always
    carry ``.alpha``, so ``alpha=None`` is refused. ``bias`` adds a per-module bias
    delta (``diff_b`` for ``diffusion_model.`` layouts, ``lora_B.bias`` for ``peft``);
    diffusers loads both as a PEFT ``lora_bias``, so a ``diff_b`` is added as it is
    (converted files get ``lora_alpha = r``) and a peft bias is scaled by ``alpha / rank``.
    ``norm_diffs`` adds the norm ``.diff`` entries LightX2V files carry, which
    diffusers drops (listed in ``dropped_keys``; the deltas leave them out).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "musubi" and (alpha is None or bias or norm_diffs):
        raise ValueError("musubi files have an alpha per module and nothing but lora_down/lora_up/alpha")
    if layout == "peft" and norm_diffs:
        raise ValueError("norm diffs exist only in the diffusion_model. layouts")

    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 if alpha is None else alpha / rank
    modules = dict(transformer.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    weight_deltas: dict[str, torch.Tensor] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    dropped: list[str] = []

    for name in lora_targets(transformer):
        linear = modules[name]
        out_features, in_features = linear.weight.shape
        # Scaled so the delta is comparable to the random base weights, not negligible.
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) / rank**0.5
        weight_deltas[name] = scale * (up @ down)
        b = torch.randn(out_features, generator=generator) * 0.1 if bias else None
        if b is not None:
            # diffusers' converter keeps ``diff_b`` as ``lora_B.bias``; PEFT then multiplies it
            # by ``lora_alpha / r``, which is 1 for converted files and alpha/rank for peft ones.
            bias_deltas[name] = b * (scale if layout == "peft" else 1.0)

        if layout == "peft":
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up
            if b is not None:
                tensors[f"{name}.lora_B.bias"] = b
        elif layout == "musubi":
            key = _musubi_name(name)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:
            key = f"diffusion_model.{_original_name(name)}"
            down_key, up_key = ("lora_down", "lora_up") if layout == "lightx2v" else ("lora_A", "lora_B")
            tensors[f"{key}.{down_key}.weight"] = down
            tensors[f"{key}.{up_key}.weight"] = up
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            if b is not None:
                tensors[f"{key}.diff_b"] = b

    if norm_diffs:
        for i, block in enumerate(transformer.blocks):
            for ours, theirs in _NORM_DIFFS.items():
                norm = block.get_submodule(ours)
                if getattr(norm, "weight", None) is None:
                    continue
                key = f"diffusion_model.blocks.{i}.{theirs}.diff"
                tensors[key] = torch.randn(norm.weight.shape, generator=generator) * 0.1
                dropped.append(key)
                if getattr(norm, "bias", None) is not None:
                    tensors[f"{key}_b"] = torch.randn(norm.bias.shape, generator=generator) * 0.1
                    dropped.append(f"{key}_b")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "peft":
        _save_peft(path, tensors, rank=rank, alpha=alpha, bias=bias, targets=lora_targets(transformer))
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return LoraFile(
        path=path,
        layout=layout,
        rank=rank,
        alpha=alpha,
        weight_deltas=weight_deltas,
        bias_deltas=bias_deltas,
        dropped_keys=tuple(dropped),
    )


def _save_peft(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float | None,
    bias: bool,
    targets: list[str],
) -> None:
    """Save through diffusers' own writer, as a diffusers training script does.

    ``save_lora_weights`` prefixes the keys with ``transformer.`` and, given adapter
    metadata, stores it as JSON under the safetensors header key
    ``lora_adapter_metadata`` (keys ``transformer.r``, ``transformer.lora_alpha``, ...);
    the loader turns that back into the ``LoraConfig``. Without metadata the loader
    infers ``r`` from the shapes and sets ``lora_alpha = r``.
    """
    from diffusers import WanPipeline

    metadata = None
    if alpha is not None:
        metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_bias": bias}
    WanPipeline.save_lora_weights(
        save_directory=path.parent,
        transformer_lora_layers=tensors,
        weight_name=path.name,
        transformer_lora_adapter_metadata=metadata,
    )


def read_adapter_metadata(path: Path) -> dict | None:
    """The ``lora_adapter_metadata`` JSON of a safetensors file, or None (what the loader reads)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else None


def merged_copy(
    transformer: WanTransformer3DModel, lora: LoraFile, scale: float = 1.0
) -> WanTransformer3DModel:
    """A deep copy of ``transformer`` with ``scale`` times the LoRA's deltas added to its weights.

    The reference a loaded adapter must match: no PEFT layers, just the linear
    weights (and biases) changed by hand. Take it before loading the LoRA: a
    transformer that already holds PEFT layers has no plain ``Linear`` to change.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in transformer.modules()):
        raise ValueError("merged_copy needs the transformer before any LoRA is loaded into it")
    merged = copy.deepcopy(transformer)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, delta in lora.weight_deltas.items():
            modules[name].weight += scale * delta.to(modules[name].weight.dtype)
        for name, delta in lora.bias_deltas.items():
            modules[name].bias += scale * delta.to(modules[name].bias.dtype)
    return merged
