"""Where a generator's weights live when the GPU cannot hold all of them.

:func:`plan_memory` decides at load, from the weights' sizes and the GPU's memory, in this order:

1. everything resident when the weights take at most WEIGHTS_SHARE of the GPU (an H200 with A14B);
2. else the text encoder in pinned host memory between clips (:class:`HostResidentModule`): it runs
   once per clip, and its round trip costs well under a second (an H100 with A14B);
3. else, for the two-expert A14B models, both experts sharing one expert's worth of GPU memory
   (:class:`ExpertSlot`), the next expert streamed in from pinned host memory while the current one
   finishes its last step (a 48 GB GPU with A14B).

The rest of the GPU is for activations, the VAE decode and the compiler's workspace.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

# Weights may take this share of the GPU; activations at 720p and the VAE decode need the rest.
WEIGHTS_SHARE = 0.75


@dataclass(frozen=True)
class MemoryPlan:
    """Which weights leave the GPU between uses."""

    stream_experts: bool  # two experts share one expert's worth of GPU memory (ExpertSlot)
    offload_text_encoder: bool  # the text encoder visits the GPU only while it encodes


def weight_bytes(modules: Iterable[torch.nn.Module | None]) -> int:
    """The bytes of the modules' parameters and buffers (meta-device modules count too)."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None for _, t in _tensors(m))


def gpu_memory_budget(device: torch.device) -> int | None:
    """The bytes this process may use on ``device`` (its share when a fraction is set); None off a GPU."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index  # "cuda" is the current one
    total = torch.cuda.get_device_properties(index).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(index))


def plan_memory(
    experts: list[torch.nn.Module],
    text_encoder: torch.nn.Module | None,
    budget_bytes: int | None,
    stream_experts: bool | None = None,
    offload_text_encoder: bool | None = None,
) -> MemoryPlan:
    """Where the weights live on a GPU of ``budget_bytes`` (None: not a GPU, everything stays put).

    ``stream_experts`` and ``offload_text_encoder`` override the choice when not None.
    """
    limit = None if budget_bytes is None else WEIGHTS_SHARE * budget_bytes
    all_experts = weight_bytes(experts)
    if stream_experts is None:
        stream_experts = limit is not None and len(experts) > 1 and all_experts > limit
    if stream_experts and len(experts) < 2:
        raise ValueError("expert streaming needs a model of two experts (A14B); this one has one")
    experts_on_gpu = all_experts // len(experts) if stream_experts else all_experts
    if offload_text_encoder is None:
        offload_text_encoder = limit is not None and experts_on_gpu + weight_bytes([text_encoder]) > limit
    return MemoryPlan(stream_experts=stream_experts, offload_text_encoder=offload_text_encoder)


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


class HostCopies:
    """Copies of a module's tensors in one host buffer, page-locked where there is a GPU, so that
    copies from it to the GPU run asynchronously at full PCIe speed.

    One buffer registered with the CUDA runtime rather than a pinned tensor each: PyTorch's pinned
    allocator rounds every allocation up to a power of two, up to twice a model's weights in host memory.
    """

    ALIGNMENT = 256  # each tensor's offset: any dtype may view it

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._layout: dict[str, tuple[int, int, torch.dtype, torch.Size]] = {}
        total = 0
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            self._layout[name] = (total, nbytes, tensor.dtype, tensor.shape)
            total += _round_up(nbytes, self.ALIGNMENT)
        # Whole pages, so that page-locking covers this buffer and nothing of its neighbours.
        page = mmap.PAGESIZE
        size = _round_up(max(total, 1), page)
        raw = torch.empty(size + page, dtype=torch.uint8)
        start = -raw.data_ptr() % page
        self._buffer = raw[start : start + size]
        if torch.cuda.is_available():
            cudart = torch.cuda.cudart()
            torch.cuda.check_error(cudart.cudaHostRegister(self._buffer.data_ptr(), size, 0))
            # Unlocked when these copies go; the memory itself lives on while a tensor views it.
            weakref.finalize(self, cudart.cudaHostUnregister, self._buffer.data_ptr())
        self.tensors: dict[str, torch.Tensor] = {}

    def store(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into its place in the buffer; returns the host copy."""
        offset, nbytes, dtype, shape = self._layout[name]
        copy = self._buffer[offset : offset + nbytes].view(dtype).view(shape)
        copy.copy_(tensor.detach())
        self.tensors[name] = copy
        return copy


def move_to_host(module: torch.nn.Module) -> HostCopies:
    """Host copies of ``module``'s parameters and buffers, which then point at them.

    Tensor by tensor, each original dropped as its copy is made: never both copies of the weights.
    """
    copies = HostCopies(_tensors(module))
    for name, tensor in _tensors(module):
        tensor.data = copies.store(name, tensor)
    return copies


class HostResidentModule:
    """A module whose weights live in pinned host memory and visit the GPU only while it runs.

    The weights never change, so offloading just drops the GPU copies: no copy back. Loading from
    pinned memory runs at PCIe speed (an 11 GB umT5-XXL in well under a second on a Hopper host).
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        self.host = move_to_host(module)

    def load(self) -> None:
        for name, tensor in _tensors(self.module):
            tensor.data = self.host.tensors[name].to(self.device, non_blocking=True)

    def offload(self) -> None:
        for name, tensor in _tensors(self.module):
            tensor.data = self.host.tensors[name]


class _ObservedBlocks(torch.nn.ModuleList):
    """A transformer's blocks that report, as the forward loop takes the next one, that the previous
    block's kernels are all enqueued: the point after which its weights may be overwritten."""

    def __init__(self, blocks: torch.nn.ModuleList, block_enqueued: Callable[[int], None]) -> None:
        super().__init__(blocks)
        self._block_enqueued = block_enqueued

    def __iter__(self) -> Iterator[torch.nn.Module]:
        for index, block in enumerate(super().__iter__()):
            if index:
                self._block_enqueued(index - 1)
            yield block
        self._block_enqueued(len(self) - 1)


class ExpertSlot:
    """The experts of an A14B model sharing one expert's worth of GPU memory.

    Both experts' weights live in pinned host memory. On the GPU there is one set of tensors, the
    slot, that the parameters of both experts point at, filled with the weights of the expert that
    runs: the experts share one architecture, so a switch is a copy into the same tensors, with no
    allocation and no fragmentation. The copy runs on a stream of its own. Armed with
    :meth:`stream_during_next_forward` before the current expert's last forward of a clip, it copies
    each block of the next expert as soon as that block's last kernels are enqueued, so the switch
    waits only for the tail of the copy instead of a whole expert (28 GB, over a second over PCIe).
    An expert that runs without having been streamed in is copied in whole before it runs
    (:attr:`unstreamed_switches` counts those); with :attr:`streaming` off, every switch is.
    """

    def __init__(self, experts: dict[str, torch.nn.Module], device: torch.device) -> None:
        shapes = {name: {key: t.shape for key, t in _tensors(m)} for name, m in experts.items()}
        if len({tuple(s.items()) for s in shapes.values()}) != 1:
            raise ValueError(f"experts {sorted(experts)} differ in architecture: they cannot share a slot")
        self.device = device
        self.host = {name: move_to_host(module) for name, module in experts.items()}
        first = next(iter(self.host.values())).tensors
        self.slot = {key: torch.empty_like(t, device=device) for key, t in first.items()}
        self._block_keys = [
            [key for key in self.slot if key.startswith(f"blocks.{index}.")]
            for index in range(len(next(iter(experts.values())).blocks))
        ]
        self._other_keys = [key for key in self.slot if not key.startswith("blocks.")]
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.holder: str | None = None  # the expert whose weights are (or will be) in the slot
        self._incoming: str | None = None  # the expert streamed in during the running forward
        self._ready: torch.cuda.Event | None = None  # set when the slot's last copy has landed
        # Off: nothing is streamed, each switch copies the next expert in whole before it runs (what
        # streaming saves, for benchmarks). The results are the same either way.
        self.streaming = True
        # Switches to an expert that was not streamed in, copied in whole before it ran.
        self.unstreamed_switches = 0
        for name, module in experts.items():
            for key, tensor in _tensors(module):
                tensor.data = self.slot[key]
            module.blocks = _ObservedBlocks(module.blocks, self._block_enqueued)
            module.register_forward_pre_hook(self._before_forward(name))
            module.register_forward_hook(self._after_forward)
        self.copy_whole(next(iter(experts)))

    def stream_during_next_forward(self, name: str) -> None:
        """Copy expert ``name`` into the slot while the holder runs its next forward, its last one
        before ``name`` is needed (the next forward must be the holder's); not when :attr:`streaming`
        is off."""
        if self.streaming and name != self.holder:
            self._incoming = name

    def _copy(self, name: str, keys: list[str]) -> None:
        """Copy expert ``name``'s tensors ``keys`` into the slot, after the GPU's work enqueued so far."""
        if self._copy_stream is None:
            for key in keys:
                self.slot[key].copy_(self.host[name].tensors[key])
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            for key in keys:
                self.slot[key].copy_(self.host[name].tensors[key], non_blocking=True)

    def _landed(self, name: str) -> None:
        """Expert ``name`` holds the slot once the copies enqueued so far have run."""
        self.holder = name
        if self._copy_stream is not None:
            self._ready = self._copy_stream.record_event()

    def copy_whole(self, name: str) -> None:
        """Copy all of expert ``name`` into the slot now (on a GPU: enqueued, and the next forward
        waits for it)."""
        self._copy(name, list(self.slot))
        self._landed(name)

    def _block_enqueued(self, index: int) -> None:
        if self._incoming is not None:
            self._copy(self._incoming, self._block_keys[index])

    def _before_forward(self, name: str) -> Callable[..., None]:
        def before(module: torch.nn.Module, args: tuple) -> None:
            if name != self.holder:
                self._incoming = None  # streaming was not armed for this expert's run: copy it whole
                self.unstreamed_switches += 1
                self.copy_whole(name)
            if self._ready is not None:
                # The compute stream waits on the GPU for the copy; the host does not.
                torch.cuda.current_stream(self.device).wait_event(self._ready)
                self._ready = None

        return before

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if self._incoming is not None:
            # The embedders and output layers run before and after the blocks: copied once all is enqueued.
            self._copy(self._incoming, self._other_keys)
            self._landed(self._incoming)
            self._incoming = None
