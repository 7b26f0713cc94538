"""The experts' block linears in 8 bits, through torchao: opt-in approximate modes, never defaults.

- ``fp8_matmuls`` (:func:`quantize_fp8_matmuls`): FP8 e4m3 weights and dynamically scaled FP8
  activations, per row, for speed on GPUs with FP8 tensor cores (Ada, Hopper). The weights must be
  on that GPU when they are quantized, so it needs them resident.
- ``weights_8bit`` (:func:`quantize_weights_8bit`): weights stored in 8 bits with one scale per output
  channel, computed in bf16 (torchao's weight-only configs): half the bytes on the GPU, in host memory
  and over PCIe, for small GPUs. ``fp8`` (e4m3) on GPUs that have FP8 (Ada, Hopper; torch dequantizes
  it for the bf16 matmul), ``int8`` anywhere (Ampere's A10G has no FP8). It runs where the weights
  are, host or GPU, so it combines with every memory tier.

The embedders and output projection stay in bf16: they are a sliver of the bytes and FLOPs and the
most sensitive to rounding. torchao is an extra (``pip install wanfactory[8bit]``).
"""

from __future__ import annotations

from typing import Literal

import torch

Weights8Bit = Literal["fp8", "int8"]
WEIGHTS_8BIT = ("fp8", "int8")
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
_FP8_CAPABILITY = (8, 9)


def check_fp8_device(device: torch.device, what: str) -> None:
    """Refuse FP8 ``what`` at load on anything but a GPU with FP8 (compute capability 8.9+)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < _FP8_CAPABILITY:
        raise ValueError(
            f"{what} needs a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper); got {device}"
            + ("; weights_8bit='int8' runs on any device" if what.startswith("weights_8bit") else "")
        )


def _block_linears_in_bf16(child: torch.nn.Module, name: str) -> bool:
    """torchao's filter: the linears of the transformer blocks not quantized yet."""
    from torchao.utils import TorchAOBaseTensor

    is_linear = isinstance(child, torch.nn.Linear)
    # A per-clip adapter slot's own small linears stay in bf16: they are swapped in place.
    in_blocks = name.startswith("blocks.") and ".lora_" not in name
    # Two generators over one set of modules (a benchmark's) must not quantize twice.
    return is_linear and in_blocks and not isinstance(child.weight, TorchAOBaseTensor)


def quantize_fp8_matmuls(module: torch.nn.Module) -> None:
    """The blocks' linear layers as FP8 e4m3 weights and dynamically scaled FP8 activations, per row."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(
        module,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=_block_linears_in_bf16,
    )


def quantize_weights_8bit(module: torch.nn.Module, kind: Weights8Bit) -> None:
    """The blocks' linear weights stored in 8 bits (``fp8`` e4m3 or ``int8``), one scale per output
    channel, computed in the activations' dtype."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if kind not in WEIGHTS_8BIT:
        raise ValueError(f"weights_8bit {kind!r}: choose one of {', '.join(WEIGHTS_8BIT)}")
    # Both are per output channel: torchao's weight-only configs take one scale per row of the weight.
    # version 2: torchao's plain Int8Tensor (version 1, AffineQuantizedTensor, is deprecated).
    config = Float8WeightOnlyConfig() if kind == "fp8" else Int8WeightOnlyConfig(version=2)
    quantize_(module, config, filter_fn=_block_linears_in_bf16)
