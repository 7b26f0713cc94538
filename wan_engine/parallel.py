"""One clip across several GPUs: diffusers' context parallelism for a Wan transformer.

Every process of the ``torch.distributed`` group holds the same weights and runs the same
denoising loop on the same inputs; inside each transformer forward, diffusers' hooks (the
model's ``_cp_plan``) split the token sequence across the group after the patch embedding,
each rank runs the blocks on its shard, and the output projection gathers it back, so every
rank ends the forward with the whole noise prediction. Text encoding and VAE decode are not
split: each rank does them in full.

Attention is where the ranks must talk:

* **Ulysses** (used when the attention heads divide by the group size: A14B's 40 heads on 2, 4
  or 8 GPUs, TI2V-5B's 24 on 2, 3, 4, 6 or 8): an all-to-all turns "my tokens, all heads" into
  "all tokens, my heads", the attention of each head runs unchanged, and a second all-to-all turns
  it back. Every diffusers backend that supports context parallelism runs it, PyTorch's SDPA
  (``native``, the engine's default) included.
* **Ring** (otherwise): key/value shards go round the group and partial results are merged through
  their log-sum-exp. ``native`` SDPA cannot return that, so ring needs ``_native_cudnn``,
  ``_native_flash``, ``flash`` or ``sage`` (diffusers 0.42.1; ``_native_efficient`` supports no
  context parallelism at all).

The split needs the token count (latent frames x latent height / 2 x latent width / 2) to divide by
the group size: true of every official Wan2.2 size on 2 and 4 GPUs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from diffusers.hooks.context_parallel import ContextParallelSplitHook
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)

# Backends whose attention op cannot return the log-sum-exp that ring attention merges partial results by.
NO_LOG_SUM_EXP_BACKENDS = frozenset({"native", "_native_npu"})

# One device mesh per process group and shape, shared by every module made parallel over it (both
# experts of an A14B model): each new mesh would otherwise create its own communicators.
_meshes: dict[tuple[object, int, int], DeviceMesh] = {}


def context_parallel_degrees(num_heads: int, world_size: int) -> tuple[int, int]:
    """``(ring_degree, ulysses_degree)`` for ``num_heads`` attention heads on ``world_size`` ranks:
    Ulysses over the heads when they divide by the world size, else ring."""
    if world_size < 2:
        raise ValueError(f"context parallelism needs at least 2 processes, got a world size of {world_size}")
    return (1, world_size) if num_heads % world_size == 0 else (world_size, 1)


def enable_context_parallel(module: torch.nn.Module) -> ContextParallelConfig:
    """Split ``module``'s token sequence over every rank of the default process group.

    ``module`` is a diffusers transformer with a ``_cp_plan`` (``WanTransformer3DModel``). Call it
    after choosing the attention backend and before ``torch.compile``, on every rank, in the same
    order. Returns the config applied; calling it again on the same module returns the same one.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "context parallelism needs torch.distributed initialized (one process per GPU, e.g. torchrun): "
            "the process group is not initialized"
        )
    world_size = dist.get_world_size()
    num_heads = int(module.config.num_attention_heads)
    ring, ulysses = context_parallel_degrees(num_heads, world_size)
    existing = getattr(module, "_parallel_config", None)
    if existing is not None and existing.context_parallel_config is not None:
        applied = existing.context_parallel_config
        if (applied.ring_degree, applied.ulysses_degree) == (ring, ulysses):
            return applied  # a second generator over the same modules (a benchmark's)
        raise ValueError(f"{type(module).__name__} is already parallel with another layout: {applied}")
    backend = _attention_backend(module)
    if ring > 1 and backend in NO_LOG_SUM_EXP_BACKENDS:
        runnable = sorted(_AttentionBackendRegistry._supports_context_parallel - NO_LOG_SUM_EXP_BACKENDS)
        raise ValueError(
            f"{num_heads} attention heads do not divide by {world_size} processes, so context parallelism "
            f"needs ring attention, which the {backend!r} attention backend cannot run (it returns no "
            f"log-sum-exp); use a world size that divides {num_heads}, or one of these backends: {runnable}"
        )
    config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=_device_mesh(ring, ulysses))
    with _cpu_device_count():
        module.enable_parallelism(config=config)
    _resolve_split_hook_signatures(module)
    log.info(
        "context parallel %s over %d ranks (%d heads, attention backend %s)",
        "ulysses" if ulysses > 1 else "ring",
        world_size,
        num_heads,
        backend,
    )
    return config


def _resolve_split_hook_signatures(module: torch.nn.Module) -> None:
    """Let ``torch.compile(fullgraph=True)`` trace the split hooks: each looks its module's ``forward``
    signature up with ``inspect.signature`` on its first call, which Dynamo cannot trace (a graph break in
    the compiled first block, where the hidden states are split). Do that lookup now, as the hook would."""
    for child in module.modules():
        for hook in getattr(getattr(child, "_diffusers_hook", None), "hooks", {}).values():
            metadata = getattr(hook, "module_forward_metadata", None)
            if isinstance(hook, ContextParallelSplitHook) and metadata.cached_parameter_indices is None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # without self
                metadata.cached_parameter_indices = {name: index for index, name in enumerate(names)}


def _attention_backend(module: torch.nn.Module) -> str:
    """The attention backend ``module``'s processors dispatch to (the process default unless set)."""
    for child in module.modules():
        chosen = getattr(getattr(child, "processor", None), "_attention_backend", None)
        if chosen is not None:
            return AttentionBackendName(chosen).value
    return _AttentionBackendRegistry.get_active_backend()[0].value


def _device_mesh(ring: int, ulysses: int) -> DeviceMesh:
    """A ``(ring, ulysses)`` mesh over the default group, the layout diffusers' hooks expect."""
    key = (dist.group.WORLD, ring, ulysses)
    if key not in _meshes:
        accelerator = torch.accelerator.current_accelerator()
        _meshes[key] = init_device_mesh(
            accelerator.type if accelerator is not None else "cpu",
            mesh_shape=(ring, ulysses),
            mesh_dim_names=("ring", "ulysses"),
        )
    return _meshes[key]


@contextmanager
def _cpu_device_count() -> Iterator[None]:
    """On a host with no accelerator (CPU tests, gloo), diffusers 0.42.1's ``enable_parallelism`` picks
    the rank's device as ``rank % torch.accelerator.device_count()``, a division by zero; it only records
    that device. Count the CPU as one device for the call. A no-op wherever there is an accelerator."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count
