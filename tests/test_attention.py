"""The engine's choice of attention kernel, and the wiring of its local FlashAttention kernel into diffusers.

The kernel itself runs on Hopper/Blackwell GPUs only; bench/attention.py checks its output against a
float32 reference there. These tests cover what runs anywhere: the choice, and that diffusers'
``flash_4_hub`` backend reaches the engine's op (and torch.compile can trace it) instead of the Hub.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName
from torch._subclasses.fake_tensor import FakeTensorMode

from wan_engine.attention import (
    AUTO,
    FLASH_ATTENTION_BACKEND,
    flash_attention,
    local_flash_attention_runs_on,
    resolve_attention_backend,
    supply_local_flash_attention,
)


@pytest.fixture
def hub_registry():
    """Restores diffusers' flash_4_hub entry after a test supplies the local kernel."""
    config = _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB]
    before = config.kernel_fn
    yield config
    config.kernel_fn = before


def test_auto_is_sdpa_where_the_flash_kernel_cannot_run():
    cpu = torch.device("cpu")
    assert not local_flash_attention_runs_on(cpu)
    assert resolve_attention_backend(AUTO, cpu) is None


def test_auto_keeps_sdpa_under_context_parallelism(monkeypatch, hub_registry):
    # As on a Hopper GPU with flash_attn.cute installed: auto takes the kernel, unless one clip is split
    # across GPUs, which diffusers' flash_4_hub backend cannot do (it would refuse at enable_parallelism).
    monkeypatch.setattr("wan_engine.attention.local_flash_attention_runs_on", lambda device: True)
    gpu = torch.device("cuda")
    assert resolve_attention_backend(AUTO, gpu) == FLASH_ATTENTION_BACKEND
    assert resolve_attention_backend(AUTO, gpu, context_parallel=True) is None


def test_a_named_backend_is_taken_as_asked():
    assert resolve_attention_backend("native", torch.device("cpu")) == "native"
    assert resolve_attention_backend(None, torch.device("cpu")) is None


def test_diffusers_flash_4_hub_backend_is_given_the_local_kernel(hub_registry):
    supply_local_flash_attention()
    assert hub_registry.kernel_fn is flash_attention


def test_the_kernel_is_one_opaque_op_with_the_output_shape_of_attention():
    # torch.compile traces the transformer blocks with fake tensors: the op must give the right shape
    # without running the CUDA kernel.
    with FakeTensorMode():
        q = torch.empty(2, 300, 4, 128, dtype=torch.bfloat16)
        kv = torch.empty(2, 77, 4, 64, dtype=torch.bfloat16)
        out = torch.ops.wan_engine.flash_attention_forward(q, kv.new_empty(2, 77, 4, 128), kv, None)
    assert out.shape == (2, 300, 4, 64) and out.dtype == torch.bfloat16


def test_causal_attention_is_refused():
    q = torch.zeros(1, 4, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not causal"):
        flash_attention(q, q, q, causal=True)


def test_settings_choose_the_fleet_actors_attention(monkeypatch):
    from infra.settings import Settings
    from tasks.fleet import engine_options

    assert engine_options(Settings()).attention_backend == AUTO
    monkeypatch.setenv("WANFACTORY_ENGINE_ATTENTION_BACKEND", "native")
    assert engine_options(Settings()).attention_backend == "native"
