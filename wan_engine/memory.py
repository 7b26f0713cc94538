"""Where a generator's weights live when the GPU cannot hold all of them.

:func:`plan_memory` decides at load, from the weights' sizes and the GPU's memory, in this order:

1. everything resident when the weights take at most WEIGHTS_SHARE of the GPU (an H200 with A14B);
2. else the text encoder in pinned host memory between clips (:class:`HostResidentModule`): it runs
   once per clip, and its round trip costs well under a second (an H100 with A14B);
3. else, for the two-expert A14B models, both experts sharing one expert's worth of GPU memory
   (:class:`ExpertSlot`), the next expert streamed in from pinned host memory while the current one
   finishes its last step (a 48 GB GPU with A14B);
4. else every expert's transformer blocks streamed through a ring of a few blocks' worth of GPU
   memory (:class:`BlockRing`), each block copied in from pinned host memory while the one before it
   runs (a 24 GB GPU: one A14B expert alone is 28.6 GB). The same tier keeps a dense model's decode
   from meeting its weights (TI2V-5B at 720p on 24 GB).

The rest of the GPU is for activations and the compiler's workspace. The VAE decode comes after the
denoising, beside the weights that stay: when the two would not fit, the decode is tiled
(``tile_decode``: diffusers' tiled decode, a little slower, and its frames are blended across tile
seams rather than bit for bit).

Weights stored in 8 bits (torchao's weight-only tensor subclasses, wan_engine.quantize) move and
count as the plain tensors they are made of: an 8-bit expert is half the bytes on the GPU, in host
memory and over PCIe.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Weights may take this share of the GPU; activations at 720p need the rest.
WEIGHTS_SHARE = 0.75
# Blocks' worth of GPU memory in a BlockRing: two, so that one block is copied in while the other runs.
BLOCK_RING_SLOTS = 2


@dataclass(frozen=True)
class MemoryPlan:
    """Which weights leave the GPU between uses."""

    stream_experts: bool  # two experts share one expert's worth of GPU memory (ExpertSlot)
    offload_text_encoder: bool  # the text encoder visits the GPU only while it encodes
    stream_blocks: bool = False  # every expert's blocks stream through a ring of a few (BlockRing)
    tile_decode: bool = False  # the VAE decodes in tiles: its whole-frame decode would not fit

    @property
    def tier(self) -> str:
        """Where the experts live, in a word for logs and benchmarks."""
        if self.stream_blocks:
            return "block-ring"
        return "expert-slot" if self.stream_experts else "resident"


def weight_bytes(modules: Iterable[torch.nn.Module | None]) -> int:
    """The bytes of the modules' parameters and buffers, 8-bit weights as stored (meta-device modules
    count too)."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None for _, t in plain_tensors(m))


def block_bytes(experts: Iterable[torch.nn.Module]) -> int:
    """The bytes of the experts' transformer blocks: what a BlockRing copies in per forward, per expert."""
    return weight_bytes(block for expert in experts for block in expert.blocks)


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
    stream_blocks: bool | None = None,
    decode_bytes: int = 0,
    tile_decode: bool | None = None,
) -> MemoryPlan:
    """Where the weights live on a GPU of ``budget_bytes`` (None: not a GPU, everything stays put).

    The experts take the first tier whose weights fit WEIGHTS_SHARE of the GPU and leave room for
    ``decode_bytes`` (the VAE's whole-frame decode of the model's largest clip) beside them: resident,
    then one expert's slot (A14B), then the block ring. The text encoder stays when it fits beside
    them by the same rule; the decode is tiled when even then it would not fit. ``stream_experts``,
    ``stream_blocks``, ``offload_text_encoder`` and ``tile_decode`` override the choice when not None.
    """
    if stream_experts and len(experts) < 2:
        raise ValueError("expert streaming needs a model of two experts (A14B); this one has one")
    if stream_experts and stream_blocks:
        raise ValueError("expert streaming and block streaming are two tiers: choose one")
    all_experts = weight_bytes(experts)
    blocks = block_bytes(experts)
    # A ring leaves on the GPU each expert's embedders and output layers, and its few blocks.
    ring_bytes = all_experts - blocks + BLOCK_RING_SLOTS * blocks // sum(len(e.blocks) for e in experts)
    tiers = {"resident": all_experts, "expert-slot": all_experts // len(experts), "block-ring": ring_bytes}
    allowed = {
        "resident": not stream_experts and not stream_blocks,
        "expert-slot": len(experts) > 1 and stream_experts is not False and not stream_blocks,
        "block-ring": stream_blocks is not False and not stream_experts,
    }
    candidates = [tier for tier in tiers if allowed[tier]]

    def fits(on_gpu: int, beside: int = 0) -> bool:
        if budget_bytes is None:
            return True
        return on_gpu <= WEIGHTS_SHARE * budget_bytes and on_gpu + beside <= budget_bytes

    # The smallest allowed tier when none fits: the decode is then tiled.
    tier = next((t for t in candidates if fits(tiers[t], decode_bytes)), candidates[-1])
    on_gpu = tiers[tier]
    text_encoder_bytes = weight_bytes([text_encoder])
    if offload_text_encoder is None:
        # A resident text encoder is still there at the decode.
        offload_text_encoder = not fits(on_gpu + text_encoder_bytes, decode_bytes)
    if tile_decode is None:
        tile_decode = not fits(on_gpu + (0 if offload_text_encoder else text_encoder_bytes), decode_bytes)
    return MemoryPlan(
        stream_experts=tier == "expert-slot",
        offload_text_encoder=offload_text_encoder,
        stream_blocks=tier == "block-ring",
        tile_decode=tile_decode,
    )


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _flatten(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """A tensor as the plain tensors it is made of: itself, or a tensor subclass's (a quantized
    weight's data and scales), named ``name/attribute``."""
    if is_traceable_wrapper_subclass(tensor):
        attributes, _ = tensor.__tensor_flatten__()
        for attribute in attributes:
            yield from _flatten(f"{name}/{attribute}", getattr(tensor, attribute))
    else:
        yield name, tensor


def plain_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module``'s parameters and buffers as plain tensors, a quantized weight as its parts."""
    for name, tensor in _tensors(module):
        yield from _flatten(name, tensor)


def _rebuilt(name: str, tensor: torch.Tensor, storage: Callable[[str], torch.Tensor]) -> torch.Tensor:
    if not is_traceable_wrapper_subclass(tensor):
        return storage(name)
    attributes, context = tensor.__tensor_flatten__()
    parts = {a: _rebuilt(f"{name}/{a}", getattr(tensor, a), storage) for a in attributes}
    return type(tensor).__tensor_unflatten__(parts, context, tensor.size(), tensor.stride())


def _repoint(
    module: torch.nn.Module, name: str, tensor: torch.Tensor, storage: Callable[[str], torch.Tensor]
) -> None:
    """Make ``module``'s parameter or buffer ``name`` (now ``tensor``) use the plain tensors that
    ``storage`` gives for its plain names: in place for a plain tensor, a new subclass around them for a
    quantized one."""
    if not is_traceable_wrapper_subclass(tensor):
        tensor.data = storage(name)
        return
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    rebuilt = _rebuilt(name, tensor, storage)
    if attribute in owner._parameters:
        owner._parameters[attribute] = torch.nn.Parameter(rebuilt, requires_grad=False)
    else:
        owner._buffers[attribute] = rebuilt


def _repoint_all(module: torch.nn.Module, storage: Callable[[str], torch.Tensor]) -> None:
    for name, tensor in list(_tensors(module)):
        _repoint(module, name, tensor, storage)


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

    @property
    def nbytes(self) -> int:
        """The buffer's size: the host memory these copies lock."""
        return self._buffer.numel()

    def store(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into its place in the buffer; returns the host copy."""
        offset, nbytes, dtype, shape = self._layout[name]
        copy = self._buffer[offset : offset + nbytes].view(dtype).view(shape)
        copy.copy_(tensor.detach())
        self.tensors[name] = copy
        return copy


def move_to_host(module: torch.nn.Module) -> HostCopies:
    """Host copies of ``module``'s parameters and buffers (as plain tensors), which then point at them.

    Tensor by tensor, each original dropped as its copy is made: never both copies of the weights.
    """
    copies = HostCopies(plain_tensors(module))
    for name, tensor in list(_tensors(module)):
        for plain_name, plain in _flatten(name, tensor):
            copies.store(plain_name, plain)
        _repoint(module, name, tensor, copies.tensors.__getitem__)
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
        host = self.host.tensors
        _repoint_all(self.module, lambda name: host[name].to(self.device, non_blocking=True))

    def offload(self) -> None:
        _repoint_all(self.module, self.host.tensors.__getitem__)


class BlockObserver(Protocol):
    """What a transformer's forward loop tells about its blocks (:class:`_ObservedBlocks`)."""

    def before_block(self, index: int) -> None:
        """Block ``index`` is about to run."""

    def block_enqueued(self, index: int) -> None:
        """Block ``index``'s kernels are all enqueued: after them, its weights may be overwritten."""


class _ObservedBlocks(torch.nn.ModuleList):
    """A transformer's blocks that report to an observer as the forward loop takes each one: before it
    runs, and once the previous block's kernels are all enqueued. The loop is outside the compiled
    blocks, so the reports are plain host code, never traced."""

    def __init__(self, blocks: torch.nn.ModuleList, observer: BlockObserver) -> None:
        super().__init__(blocks)
        self._observer = observer

    def __iter__(self) -> Iterator[torch.nn.Module]:
        for index, block in enumerate(super().__iter__()):
            if index:
                self._observer.block_enqueued(index - 1)
            self._observer.before_block(index)
            yield block
        self._observer.block_enqueued(len(self) - 1)


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
        shapes = {name: _layout(m) for name, m in experts.items()}
        if len(set(shapes.values())) != 1:
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
            _repoint_all(module, self.slot.__getitem__)
            module.blocks = _ObservedBlocks(module.blocks, self)
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

    def before_block(self, index: int) -> None:
        """Every block of the holder is in the slot before its forward starts: nothing to do."""

    def block_enqueued(self, index: int) -> None:
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


def _layout(module: torch.nn.Module) -> tuple[tuple[str, torch.Size, torch.dtype], ...]:
    """What must match for two modules to share GPU tensors: their plain tensors' names, shapes, dtypes."""
    return tuple((name, t.shape, t.dtype) for name, t in plain_tensors(module))


class BlockRing:
    """Every expert's transformer blocks streamed through a ring of a few blocks' worth of GPU memory.

    For GPUs that cannot hold one expert (an A14B expert is 28.6 GB in bf16; a 24 GB card). The
    blocks' weights live in pinned host memory, one registered buffer per expert (:class:`HostCopies`);
    on the GPU there are ``slots`` sets of one block's tensors, and block ``i`` of every expert points at
    set ``i % slots`` for good: a block's tensors never move, so compiled blocks see the same tensors at
    every call and nothing is allocated per step. As the forward loop finishes enqueueing block ``i``,
    block ``i + slots`` is copied into the set it used, on a stream of its own, after block ``i``'s
    kernels (an event); block ``i + slots`` waits for its copy on the GPU, the host never does. After a
    forward's last blocks the ring fills with the first blocks of the next forward: the same expert's,
    or the one named by :meth:`next_forward_is` (the generator knows the schedule). Whatever was not
    prefetched is copied before it runs (:attr:`unprefetched_blocks` counts those), so the frames are
    the resident ones, bit for bit, whatever the order.

    This is our own rather than diffusers' group offloading with streams: group offloading pins each
    tensor on its own (PyTorch's pinned allocator rounds each up to a power of two, up to 2x host
    memory, and a 24 GB card's host often has less than two experts' worth to spare), gives each expert
    its own GPU copies and allocates them at every onload; the ring keeps one buffer per expert in host
    memory, one set of ``slots`` blocks on the GPU for both experts, and the prefetch across the switch.
    Embedders and output layers (under 1 % of an expert) stay on the GPU.
    """

    def __init__(
        self, experts: dict[str, torch.nn.Module], device: torch.device, slots: int = BLOCK_RING_SLOTS
    ) -> None:
        layouts = {_layout(block) for module in experts.values() for block in module.blocks}
        if len(layouts) != 1:
            raise ValueError(f"the blocks of {sorted(experts)} differ in architecture: no ring for them")
        self.block_count = len(next(iter(experts.values())).blocks)
        if not 1 <= slots <= self.block_count:
            raise ValueError(f"a ring of {slots} blocks for a model of {self.block_count}: too many or none")
        self.device, self.slots = device, slots
        # Each expert's blocks in host memory, named "index.tensor" as in the ModuleList.
        self.host = {name: move_to_host(module.blocks) for name, module in experts.items()}
        first_block = next(iter(experts.values())).blocks[0]
        self._keys = [key for key, _ in plain_tensors(first_block)]
        self.ring = [
            {key: torch.empty_like(t, device=device) for key, t in plain_tensors(first_block)}
            for _ in range(slots)
        ]
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # (expert, block) in each set, or on its way there.
        self._held: list[tuple[str, int] | None] = [None] * slots
        self._copied: list[torch.cuda.Event | None] = [None] * slots  # each set's last copy landed
        self._released: list[torch.cuda.Event | None] = [None] * slots  # its last reader's kernels ran
        self._running: str | None = None
        self._next: str | None = None  # the expert of the forward after the running one, when told
        # Blocks copied in only as they were needed: the GPU waited for their copy (the host never does).
        self.unprefetched_blocks = 0
        self.blocks_copied = 0
        for name, module in experts.items():
            for index, block in enumerate(module.blocks):
                _repoint_all(block, self.ring[index % slots].__getitem__)
            module.blocks = _ObservedBlocks(module.blocks, self)
            module.register_forward_pre_hook(self._before_forward(name))
            module.register_forward_hook(self._after_forward)

    @property
    def host_bytes(self) -> int:
        """Pinned host memory the ring's experts' blocks take."""
        return sum(copies.nbytes for copies in self.host.values())

    @property
    def gpu_bytes(self) -> int:
        """GPU memory the ring takes: ``slots`` blocks."""
        return sum(t.numel() * t.element_size() for tensors in self.ring for t in tensors.values())

    def bytes_per_forward(self) -> int:
        """Bytes copied in per forward: one expert's blocks."""
        return self.gpu_bytes // self.slots * self.block_count

    def next_forward_is(self, name: str) -> None:
        """The forward after the running (or next) one is expert ``name``'s: prefetch its first blocks."""
        self._next = name

    def before_block(self, index: int) -> None:
        if self._running is None:
            return  # the blocks iterated outside a forward: nothing runs
        slot = index % self.slots
        wanted = (self._running, index)
        if self._held[slot] != wanted:
            self.unprefetched_blocks += 1
            self._fill(slot, *wanted)
        if self._copied[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
            self._copied[slot] = None

    def block_enqueued(self, index: int) -> None:
        if self._running is None:
            return
        slot = index % self.slots
        if self._copy_stream is not None:
            self._released[slot] = torch.cuda.current_stream(self.device).record_event()
        following = index + self.slots
        if following < self.block_count:
            self._fill(slot, self._running, following)
        else:
            self._fill(slot, self._next or self._running, following - self.block_count)

    def _fill(self, slot: int, expert: str, index: int) -> None:
        """Copy expert ``expert``'s block ``index`` into set ``slot``, once that set's last reader ran."""
        host = self.host[expert].tensors
        target = self.ring[slot]
        self._held[slot] = (expert, index)
        self.blocks_copied += 1
        if self._copy_stream is None:
            for key in self._keys:
                target[key].copy_(host[f"{index}.{key}"])
            return
        if self._released[slot] is not None:
            self._copy_stream.wait_event(self._released[slot])
        with torch.cuda.stream(self._copy_stream):
            for key in self._keys:
                target[key].copy_(host[f"{index}.{key}"], non_blocking=True)
        self._copied[slot] = self._copy_stream.record_event()

    def _before_forward(self, name: str) -> Callable[..., None]:
        def before(module: torch.nn.Module, args: tuple) -> None:
            self._running = name

        return before

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self._running = self._next = None
