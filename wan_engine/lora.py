"""LoRA adapters on a loaded Wan2.2 pipeline, through diffusers' own LoRA API (PEFT underneath).

Two ways an adapter is applied, for two uses:

- **Fused** (:func:`fuse_adapters`): a fleet-wide adapter such as a distillation LoRA is loaded
  per expert with ``load_lora_weights`` (``load_into_transformer_2`` for the low-noise expert),
  fused into the weights with ``fuse_lora`` on every expert that has one (its default fuses only
  ``transformer``), and the LoRA layers are unloaded: the blocks are plain linears again and a
  step costs what it cost before.
- **Per clip** (:class:`AdapterSlot`): brand styles at a per-clip scale. Every expert gets one
  LoRA slot of a fixed rank on the layers published Wan LoRAs train, made before the blocks are
  compiled (``enable_lora_hotswap``); a clip's adapters are hot-swapped into it
  (``load_lora_weights(..., hotswap=True)``), which copies weights into the same tensors, so the
  compiled blocks are not recompiled. Several adapters at once are one LoRA of the summed rank
  (their factors stacked, each scale folded into its ``B``), and "none" zeroes the slot: the
  layers then add an exact zero to the base's output.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from diffusers import DiffusionPipeline

from wan_engine.adapters import AdapterWeights

log = logging.getLogger(__name__)

# The linear layers of each block that published Wan LoRAs train (Wan's self_attn/cross_attn q, k, v, o
# and ffn.0/ffn.2), by diffusers' names: the per-clip slot covers exactly these.
SLOT_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
_COMPONENT = {"high_noise": "transformer", "low_noise": "transformer_2", "dense": "transformer"}
SLOT_NAME = "clip"
# Converted state dicts kept in host memory, so an actor alternating between a few styles reads each
# file once (a rank-64 A14B LoRA is ~300 MB per expert).
_STATE_DICT_CACHE = 4


def _load(pipeline: DiffusionPipeline, source: object, expert: str, name: str, hotswap: bool = False) -> None:
    pipeline.load_lora_weights(
        source, adapter_name=name, hotswap=hotswap, load_into_transformer_2=expert == "low_noise"
    )


def fuse_adapters(pipeline: DiffusionPipeline, adapters: Sequence[AdapterWeights]) -> float:
    """Fuse ``adapters`` (local files) into the pipeline's experts at their scales; the seconds it took."""
    if not adapters:
        return 0.0
    started = time.perf_counter()
    names_by_component: dict[str, list[str]] = {}
    names, scales = [], []
    for index, adapter in enumerate(adapters):
        for expert, path in adapter.files:
            # One PEFT adapter per file: set_adapters names every adapter it keeps active.
            name = f"fused{index}_{expert}"
            _load(pipeline, path, expert, name)
            names_by_component.setdefault(_COMPONENT[expert], []).append(name)
            names.append(name)
            scales.append(adapter.scale)
    pipeline.set_adapters(names, scales)
    for component, component_names in names_by_component.items():
        pipeline.fuse_lora(components=[component], adapter_names=component_names, lora_scale=1.0)
    pipeline.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    seconds = time.perf_counter() - started
    log.info(
        "adapters fused adapters=%s seconds=%.2f",
        ",".join(f"{a.name}:{a.scale:g}" for a in adapters),
        seconds,
    )
    return seconds


class AdapterError(ValueError):
    """Adapters that cannot go into the per-clip slot (too large a rank, layers it does not hold)."""


def _rank(state: Mapping[str, torch.Tensor]) -> int:
    """A LoRA state dict's rank (its ``lora_A`` factors' rows)."""
    return next(t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight"))


class _Part(NamedTuple):
    """One adapter's file for one expert, as the slot combines it."""

    state: dict[str, torch.Tensor]
    scale: float
    name: str
    rank: int


class AdapterSlot:
    """One LoRA slot of a fixed rank in every expert, that clips' adapters are hot-swapped into."""

    def __init__(
        self, pipeline: DiffusionPipeline, experts: Mapping[str, torch.nn.Module], rank: int
    ) -> None:
        self.pipeline, self.experts, self.rank = pipeline, dict(experts), rank
        pipeline.enable_lora_hotswap(target_rank=rank)
        for expert, module in self.experts.items():
            _load(pipeline, self._zero_state_dict(module), expert, SLOT_NAME)
        self.loaded: tuple[tuple[str, str | None, float], ...] = ()  # the keys of the adapters in it
        self.swaps = 0
        self._state_dicts: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._device = next(iter(self.experts.values())).device

    def _zero_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A rank-``rank`` LoRA of zeros on every slot target: the slot before any clip uses it."""
        state: dict[str, torch.Tensor] = {}
        for index, block in enumerate(module.blocks):
            for target in SLOT_TARGETS:
                linear = block.get_submodule(target)
                prefix = f"transformer.blocks.{index}.{target}"
                state[f"{prefix}.lora_A.weight"] = torch.zeros(self.rank, linear.in_features)
                state[f"{prefix}.lora_B.weight"] = torch.zeros(linear.out_features, self.rank)
        return state

    def _state_dict(self, path: str) -> dict[str, torch.Tensor]:
        """The file's LoRA in diffusers' layout (diffusers converts the others), ``alpha / rank`` folded
        into ``lora_B`` for PEFT files whose metadata gives an alpha; in pinned host memory on a GPU
        host, so a swap's copies to the GPU run at full bus speed."""
        cached = self._state_dicts.get(path)
        if cached is not None:
            self._state_dicts.move_to_end(path)
            return cached
        state, metadata = self.pipeline.lora_state_dict(path, return_lora_metadata=True)
        biased = [key for key in state if key.endswith("lora_B.bias")]
        if biased:
            raise AdapterError(f"{path} carries bias deltas ({biased[0]}); use it fused, through a recipe")
        # save_lora_weights writes the adapter config under the component's prefix (transformer.lora_alpha).
        metadata = metadata or {}
        alpha = metadata.get("transformer.lora_alpha", metadata.get("lora_alpha"))
        if alpha is not None:
            rank = _rank(state)
            state = {
                key: tensor * (alpha / rank) if key.endswith("lora_B.weight") else tensor
                for key, tensor in state.items()
            }
        if self._device.type == "cuda":
            state = {key: tensor.pin_memory() for key, tensor in state.items()}
        self._state_dicts[path] = state
        if len(self._state_dicts) > _STATE_DICT_CACHE:
            self._state_dicts.popitem(last=False)
        return state

    def _layout(
        self, adapters: Sequence[AdapterWeights], expert: str
    ) -> tuple[list[_Part], dict[str, torch.nn.Module]]:
        """The parts of ``adapters`` that have a file for ``expert`` and the base linear of every layer
        they touch; :class:`AdapterError` for a summed rank over the slot's or a layer it does not hold."""
        parts = []
        for adapter in adapters:
            path = adapter.file_for(expert)
            if path is not None:
                state = self._state_dict(path)
                parts.append(_Part(state, adapter.scale, adapter.name, _rank(state)))
        names, total = ", ".join(part.name for part in parts), sum(part.rank for part in parts)
        if total > self.rank:
            raise AdapterError(
                f"adapters {names} need rank {total} together; the per-clip "
                f"slot holds {self.rank} (WANFACTORY_ADAPTER_SLOT_RANK)"
            )
        module = self.experts[expert]
        layers: dict[str, torch.nn.Module] = {}
        for prefix in sorted({key.rsplit(".lora_", 1)[0] for part in parts for key in part.state}):
            target = prefix.removeprefix("transformer.")
            try:
                linear = module.get_submodule(target)
            except AttributeError:
                linear = None
            if linear is None or target.split(".", 2)[-1] not in SLOT_TARGETS:
                raise AdapterError(f"{names}: layer {target} is not one the slot holds")
            layers[prefix] = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
        return parts, layers

    def _combined(self, adapters: Sequence[AdapterWeights], expert: str) -> dict[str, torch.Tensor] | None:
        """One LoRA for ``expert`` that is the sum of ``adapters`` at their scales, or None when none of
        them has a file for it: factors stacked along the rank, each scale folded into its ``B``,
        padded with zeros so every layer has the same rank (PEFT then scales by exactly 1). Built on
        the expert's device, so PEFT's copy into the slot stays there."""
        parts, layers = self._layout(adapters, expert)
        if not parts:
            return None
        device, padding = self._device, self.rank - sum(part.rank for part in parts)
        combined: dict[str, torch.Tensor] = {}
        for prefix, base in layers.items():
            downs, ups = [], []
            for part in parts:
                down = part.state.get(f"{prefix}.lora_A.weight")
                up = part.state.get(f"{prefix}.lora_B.weight")
                if down is None:
                    downs.append(torch.zeros(part.rank, base.in_features, device=device))
                    ups.append(torch.zeros(base.out_features, part.rank, device=device))
                    continue
                downs.append(down.to(device, non_blocking=True).float())
                ups.append(up.to(device, non_blocking=True).float() * part.scale)
            downs.append(torch.zeros(padding, base.in_features, device=device))
            ups.append(torch.zeros(base.out_features, padding, device=device))
            combined[f"{prefix}.lora_A.weight"] = torch.cat(downs, dim=0)
            combined[f"{prefix}.lora_B.weight"] = torch.cat(ups, dim=1)
        return combined

    def check(self, adapters: Sequence[AdapterWeights]) -> None:
        """Raise :class:`AdapterError` now (at prepare) for adapters the slot cannot take."""
        for expert in self.experts:
            self._layout(adapters, expert)

    def use(self, adapters: Sequence[AdapterWeights]) -> float | None:
        """Put ``adapters`` in the slot (none: zeroes it); the seconds the swap took, None if they were
        there already."""
        wanted = tuple(adapter.key for adapter in adapters)
        if wanted == self.loaded:
            return None
        started = time.perf_counter()
        for expert, module in self.experts.items():
            combined = self._combined(adapters, expert)
            if combined is None:
                self._zero(module)
            else:
                _load(self.pipeline, combined, expert, SLOT_NAME, hotswap=True)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self.loaded = wanted
        self.swaps += 1
        seconds = time.perf_counter() - started
        log.info(
            "adapters swapped adapters=%s seconds=%.3f", ",".join(a.name for a in adapters) or "none", seconds
        )
        return seconds

    @staticmethod
    def _zero(module: torch.nn.Module) -> None:
        """No adapter on this expert: its slot's ``B`` factors to zero, so the layers add exactly zero."""
        for name, parameter in module.named_parameters():
            if f"lora_B.{SLOT_NAME}." in name:
                parameter.data.zero_()
