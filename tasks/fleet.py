"""The Ray fan-out: generator actors that each pin one GPU, and a dispatcher that streams clips through them.

Ray's batch-inference pattern: :class:`GeneratorActor` loads its Wan2.2 generator
once in ``__init__`` and serves many clips. :class:`GenerationFleet` hands clips to
actors a few at a time (so a slow clip never holds a batch), and as each clip's
frames are ready it starts a CPU task that post-processes and publishes them, so finished
clips are post-processed and uploaded while the GPUs generate the next ones.

A lost actor loses nothing: when an actor's process dies (a crash, the OOM killer, its
node), Ray restarts it with its model, the clips it held are generated again (a bounded
number of times) and the manifest records each lost attempt. A hung one is stopped: a clip that holds
its GPU past its deadline (tasks/watchdog.py) has its actor killed and restarted the same way.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from catalogs.sources import read_bytes
from infra.objectstore import ObjectStore
from infra.settings import ObjectStoreConfig, Settings
from tasks import metrics
from tasks.cost import CPU, gpu_type_key, priced
from tasks.publish import Finisher, FinishingContext
from tasks.records import ClipSpec, GeneratedClip, Loadout, ManifestEntry, failed_entry
from tasks.watchdog import GpuHolds, clip_deadline, timed_out
from wan_engine import (
    AdapterWeights,
    EngineOptions,
    GeneratedVideo,
    WanGenerator,
    get_model_spec,
    model_location,
)
from wan_engine.adapters import adapter_cache, local_adapter

log = logging.getLogger(__name__)

# Clips queued per actor: one rendering and one being prepared, so an actor never idles on the driver.
CLIPS_IN_FLIGHT_PER_ACTOR = 2
# Calls an actor runs at once: one rendering on the GPU, one preparing or handing frames back.
ACTOR_CONCURRENCY = 2
# Back-pressure. Generated frames wait in Ray's object store for a CPU finisher. While they fit in
# FINISHING_MEMORY_SHARE of the store, actors keep generating: post-production may take longer than
# generation (3x, for a 6-step TI2V-5B clip; bench/README.md), and a fixed small window then idles the
# GPUs. Past it, actors pause until finishers catch up, so host memory stays bounded and frames are
# never spilled to disk. FINISHING_PER_ACTOR clips per actor are always allowed, so a small store still
# makes progress.
FINISHING_MEMORY_SHARE = 0.5
FINISHING_PER_ACTOR = 2
# Finisher actors per generator actor, at most: post-production of a clip takes up to a few times its
# generation on the CPU (bench/README.md), and each finisher is a process with its own classifier.
FINISHERS_PER_GENERATOR = 8
# Times a finisher's call is retried on a restarted finisher after its process died, as Ray retried the
# task it replaces. A finisher holds nothing but its loaded tools, so Ray may restart it without limit.
FINISHER_RETRIES = 2
# Times a clip is generated again after its attempt was lost with its actor: enough for a one-off
# crash, few enough that a clip that kills every actor it meets ends as failed instead of looping.
CLIP_RETRIES = 2
# Restarts per actor (each reloads the model): a clip that kills its actor on every attempt uses
# 1 + CLIP_RETRIES of them and leaves as many again for the rest of the run.
ACTOR_MAX_RESTARTS = 2 * (1 + CLIP_RETRIES)
# Times a clip is generated again after the watchdog stopped it for holding its GPU past its deadline
# (tasks/watchdog.py): once, in case its actor or GPU was at fault; a clip that hangs again is failed
# rather than taking another actor's time. Each stop restarts an actor, within ACTOR_MAX_RESTARTS.
CLIP_TIMEOUT_RETRIES = 1
# The watchdog's registry answers in milliseconds; past this, the dispatcher goes on and asks again later.
GPU_HOLDS_ANSWER_TIMEOUT_S = 10.0
# The dispatcher looks at the GPU holds a tenth of the deadline floor apart, and at least this often:
# a hung clip is stopped that long after its deadline at most, for one small call per look.
WATCH_INTERVAL_MAX_S = 10.0
# The registry's name begins so: a person (or a test) finds a running fleet's with ray.util.list_named_actors.
GPU_HOLDS_NAME_PREFIX = "wanfactory-gpu-holds-"
# A restart reloads the model: minutes at real size, more when a new host first downloads the weights.
# Past this, the restart cannot be placed (no node with a free GPU): the actor is given up.
ACTOR_RESTART_TIMEOUT_S = 1800.0
# What an attempt lost with its actor looks like: the actor's process or node died during the clip
# (ActorDiedError, or ActorUnavailableError while Ray notices and restarts it), or the frames were
# lost with their node before the finisher read them.
GENERATION_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


def connect_ray(settings: Settings) -> None:
    """Join the configured Ray cluster, or start a local one bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
        return
    # A local, single-user Ray: no token auth, and no listening on outside addresses.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=settings.ray_object_store_bytes,
        log_to_driver=True,
        # Ray's per-node metrics agent serves it without the dashboard (tasks/metrics.py).
        _metrics_export_port=settings.ray_metrics_export_port,
    )


class GeneratorActor:
    """One loaded Wan2.2 generator serving clips; created with ``num_gpus=1`` on GPU clusters.

    A threaded actor (``max_concurrency=ACTOR_CONCURRENCY``) so the GPU never waits between clips:
    while one clip holds the GPU, the next one's image is fetched and its prompts are encoded (on a
    stream of their own), and the previous one's frames are handed to Ray. Only one clip renders at
    a time: the lock keeps a second denoising loop from competing for the GPU's memory and compute.
    """

    def __init__(
        self,
        family: str,
        variant: str,
        model_root: str,
        cache_dir: Path,
        device: str,
        store_config: ObjectStoreConfig,
        options: EngineOptions,
        fused_adapters: Sequence[AdapterWeights] = (),
        gpu_holds: ray.actor.ActorHandle | None = None,
    ) -> None:
        """``gpu_holds``: the fleet's :class:`~tasks.watchdog.GpuHolds`, told when a clip takes and lets go of
        the GPU (None: no watchdog watches this actor)."""
        started = time.perf_counter()
        # Loading bars from many actors interleave into noise in the driver's log.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        model = get_model_spec(family, variant)
        self.store = ObjectStore(store_config)
        self.generator = WanGenerator.from_pretrained(
            model_location(model_root, model),
            model,
            device=device,
            cache_dir=cache_dir,
            client=self.store.client,
            options=options,
            fused_adapters=fused_adapters,
        )
        self.adapter_cache = adapter_cache(cache_dir)
        self.render_lock = threading.Lock()
        self.gpu_holds = gpu_holds
        gpus = ray.get_gpu_ids()
        node = ray.get_runtime_context().get_node_id()[:8]
        self.worker = f"{node}/{'gpu' + ','.join(map(str, gpus)) if gpus else 'cpu'}/pid{os.getpid()}"
        device = self.generator.device
        # What its clips' GPU time is priced as (tasks.cost).
        self.gpu_type = gpu_type_key(torch.cuda.get_device_name(device) if device.type == "cuda" else CPU)
        # Weights to GPU and warm-up (compilation) included: what a (re)start costs before the first clip.
        self.load_seconds = time.perf_counter() - started

    def name(self) -> str:
        return self.worker

    def loaded(self) -> tuple[str, float, str]:
        """The worker's name, the seconds its model took to load and warm up, and the attention kernel
        its engine runs ("auto" chooses by what is installed: what an operator checks on a slow GPU)."""
        return self.worker, self.load_seconds, self.generator.attention_backend or "native"

    @ray.method(num_returns=2)
    def generate(self, clip: ClipSpec) -> tuple[str, GeneratedClip]:
        """The worker that ran the clip, and its frames or the error that stopped it.

        Two returns so the dispatcher can read the small first one to learn whether the attempt
        outlived the actor, and hand the second (the frames) to a finisher without fetching it.
        A clip's own failure is not the actor's: it comes back as the clip's ``error``. The clip's GPU time
        is the time it held the render lock (the GPU), whether it succeeded or not.
        """
        held_since = None  # perf_counter when the clip took the GPU
        try:
            fetch_started = time.perf_counter()
            image = self._image(clip) if clip.image_uri else None
            adapters = tuple(
                local_adapter(a, self.adapter_cache, self.store.client) for a in clip.request.adapters
            )
            fetch_seconds = time.perf_counter() - fetch_started
            request = replace(clip.request, image=image, adapters=adapters)
            prepared = self.generator.prepare(request) if self.generator.prepares_concurrently else None
            with self.render_lock, self._holding_gpu(clip):
                started_at, held_since = datetime.now(UTC), time.perf_counter()
                # Frames are on the host when render returns: the GPU is free for the next clip.
                video = self.generator.render(prepared or self.generator.prepare(request))
                gpu_seconds = time.perf_counter() - held_since
        except Exception as err:
            log.warning("generation failed clip_id=%s error=%s", clip.clip_id, err)
            if isinstance(err, torch.OutOfMemoryError):
                metrics.count(metrics.OUT_OF_MEMORY, model=clip.model.name, where="gpu")
            return self.worker, GeneratedClip(
                clip=clip,
                frames=None,
                worker=self.worker,
                engine_mode=self.generator.options.mode,
                gpu_seconds=None if held_since is None else time.perf_counter() - held_since,
                gpu_type=self.gpu_type,
                error=f"{type(err).__name__}: {err}",
            )
        self._record_stages(clip, video, fetch_seconds)
        return self.worker, GeneratedClip(
            clip=clip,
            frames=video.frames,
            worker=self.worker,
            engine_mode=self.generator.options.mode,
            seconds=video.seconds,
            expert_calls=video.expert_calls,
            started_at=started_at,
            prompt_tokens=video.prompt_tokens,
            prompt_tokens_kept=video.prompt_tokens_kept,
            adapter_swap_seconds=video.adapter_swap_seconds,
            gpu_seconds=gpu_seconds,
            gpu_type=self.gpu_type,
        )

    @staticmethod
    def _record_stages(clip: ClipSpec, video: GeneratedVideo, fetch_seconds: float) -> None:
        """The clip's stage latencies and adapter swap, for Prometheus (tasks.metrics)."""
        stages = dict(video.stage_seconds)
        # Preparing a clip is fetching its image and adapters, then encoding its prompts.
        stages["prepare"] = fetch_seconds + stages.pop("encode", 0.0)
        if video.adapter_swap_seconds is not None:
            stages["adapter_swap"] = video.adapter_swap_seconds
            metrics.count(metrics.ADAPTER_SWAPS, model=clip.model.name)
        metrics.stage_seconds(clip, stages)

    @contextmanager
    def _holding_gpu(self, clip: ClipSpec) -> Iterator[None]:
        """Tell the watchdog's registry that this call holds the GPU until the block ends. Not awaited:
        Ray sends it from its own threads, so it goes out even if this one hangs right after."""
        if self.gpu_holds is None:
            yield
            return
        call = ray.get_runtime_context().get_task_id()  # the id the dispatcher reads from the call's ref
        self.gpu_holds.took.remote(call, clip.clip_id, clip.label, self.worker)
        try:
            yield
        finally:
            self.gpu_holds.released.remote(call)

    def _image(self, clip: ClipSpec) -> Image.Image:
        data = read_bytes(clip.image_uri, self.store.client)
        if hashlib.sha256(data).hexdigest() != clip.image_sha256:
            raise ValueError(f"image {clip.image_uri} changed after planning")
        return Image.open(io.BytesIO(data)).convert("RGB")


@dataclass(frozen=True)
class ActorGroup:
    """The generator actors of one loadout (a model and its fused adapters), and whether they need a slot
    for per-clip adapters (made at load, before compilation: only when a clip of theirs names adapters)."""

    loadout: Loadout
    adapter_slot_rank: int = 0
    # (width, height, frames) most of its clips have: its actors warm up (compile, autotune) at that shape.
    warmup_shape: tuple[int, int, int] | None = None


def actor_groups(clips: Sequence[ClipSpec], slot_rank: int) -> dict[str, ActorGroup]:
    """The actor groups ``clips`` need, by loadout name."""
    loadouts = {clip.loadout.name: clip.loadout for clip in clips}
    with_adapters = {clip.loadout.name for clip in clips if clip.request.adapters}
    shapes: dict[str, Counter] = {name: Counter() for name in loadouts}
    for clip in clips:
        shapes[clip.loadout.name][(clip.request.width, clip.request.height, clip.request.num_frames)] += 1
    return {
        name: ActorGroup(
            loadout, slot_rank if name in with_adapters else 0, shapes[name].most_common(1)[0][0]
        )
        for name, loadout in sorted(loadouts.items())
    }


def engine_options(settings: Settings, group: ActorGroup | None = None) -> EngineOptions:
    """The engine's fast exact defaults, plus any approximate mode the settings opt into, for ``group``'s
    actors (their adapter slot, and a warm-up at the shape their clips have)."""
    return EngineOptions(
        attention_backend=settings.engine_attention_backend,
        step_cache_interval=settings.engine_step_cache_interval,
        fp8_matmuls=settings.engine_fp8_matmuls,
        weights_8bit=settings.engine_weights_8bit,
        block_streaming=settings.engine_block_streaming,
        expert_streaming=settings.engine_expert_streaming,
        text_encoder_offload=settings.engine_text_encoder_offload,
        vae_tiling=settings.engine_vae_tiling,
        adapter_slot_rank=group.adapter_slot_rank if group else 0,
        warmup_shape=group.warmup_shape if group else None,
    )


AdapterKey = tuple[tuple[str, str | None, float], ...]


def adapter_key(clip: ClipSpec) -> AdapterKey:
    """The per-clip adapters a clip needs in its actor's slot: clips with equal keys need no swap."""
    return tuple(adapter.key for adapter in clip.request.adapters)


class ClipQueue:
    """One actor group's clips waiting for an actor, by the per-clip adapters they need.

    An actor takes the clips of the adapters it holds while there are any, then the next set's: each
    actor swaps adapters once per set at most, whatever order the rows came in.
    """

    def __init__(self, clips: Sequence[ClipSpec] = ()) -> None:
        self._by_adapters: dict[AdapterKey, deque[ClipSpec]] = {}
        for clip in sorted(clips, key=lambda c: len(adapter_key(c)) > 0):  # clips without adapters first
            self._by_adapters.setdefault(adapter_key(clip), deque()).append(clip)
        # When each queued clip joined the queue (monotonic), for its queue wait (tasks.metrics).
        self._queued_at = dict.fromkeys((clip.clip_id for clip in clips), time.monotonic())

    def __bool__(self) -> bool:
        return any(self._by_adapters.values())

    def _queue_for(self, holding: AdapterKey) -> deque[ClipSpec]:
        held = self._by_adapters.get(holding)
        return held if held else next(queue for queue in self._by_adapters.values() if queue)

    def peek(self, holding: AdapterKey) -> ClipSpec:
        """The clip :meth:`take` would give an actor holding ``holding``."""
        return self._queue_for(holding)[0]

    def take(self, holding: AdapterKey) -> ClipSpec:
        return self._queue_for(holding).popleft()

    def waited(self, clip: ClipSpec) -> float:
        """Seconds a clip just taken spent in the queue since it joined it (or was put back)."""
        return time.monotonic() - self._queued_at.pop(clip.clip_id)

    def put_back(self, clip: ClipSpec) -> None:
        """At the front of its set: it has waited its turn once already."""
        self._by_adapters.setdefault(adapter_key(clip), deque()).appendleft(clip)
        self._queued_at[clip.clip_id] = time.monotonic()


@dataclass(frozen=True)
class FleetShape:
    """How many generator actors each model gets, and what each one reserves."""

    actors: Mapping[str, int]  # model family -> actor count
    num_gpus: float  # per actor
    num_cpus: float  # per actor


def plan_fleets(
    clip_counts: Mapping[str, int], gpus: int, cpu_actors_per_model: int, actor_cpus: float
) -> list[FleetShape]:
    """The fleets a run needs, one after another.

    With GPUs, each actor pins one; when there are at least as many GPUs as models,
    all models run at once with GPUs shared in proportion to their clips, otherwise
    the models take turns with every GPU. Without GPUs, each model gets
    ``cpu_actors_per_model`` CPU actors, all at once.
    """
    families = sorted(family for family, count in clip_counts.items() if count)
    if not families:
        return []
    if gpus == 0:
        return [FleetShape(dict.fromkeys(families, cpu_actors_per_model), 0, actor_cpus)]
    if gpus < len(families):
        return [FleetShape({f: gpus}, 1, actor_cpus) for f in families]
    total = sum(clip_counts[f] for f in families)
    shares = {f: max(1, gpus * clip_counts[f] // total) for f in families}
    # Hand GPUs left by rounding to the models with the most clips per GPU.
    while sum(shares.values()) < gpus:
        busiest = max(families, key=lambda f: clip_counts[f] / shares[f])
        shares[busiest] += 1
    while sum(shares.values()) > gpus:
        idlest = min((f for f in families if shares[f] > 1), key=lambda f: clip_counts[f] / shares[f])
        shares[idlest] -= 1
    return [FleetShape(shares, 1, actor_cpus)]


def admits_generation(
    generating: Sequence[ClipSpec],
    finishing: Sequence[ClipSpec],
    candidate: ClipSpec,
    budget_bytes: int,
    floor_clips: int,
) -> bool:
    """Back-pressure: whether ``candidate`` may start generating, given the clips generating (whose
    frames are on their way) and those waiting for or in post-production. Below ``floor_clips`` in
    post-production, always; above it, while all their frames fit in ``budget_bytes``."""
    if len(finishing) < floor_clips:
        return True
    waiting = sum(clip.frames_bytes for clip in (*generating, *finishing))
    return waiting + candidate.frames_bytes <= budget_bytes


def retries_lost_attempt(reasons: Sequence[str]) -> bool:
    """Whether a clip is generated again after the attempts lost with their actor for ``reasons`` (oldest
    first): up to CLIP_RETRIES of them, of which up to CLIP_TIMEOUT_RETRIES stopped by the watchdog."""
    return len(reasons) <= CLIP_RETRIES and sum(map(timed_out, reasons)) <= CLIP_TIMEOUT_RETRIES


class FleetStartError(RuntimeError):
    """A model could not be loaded on its actors."""


@dataclass
class _Member:
    """One generator actor as the dispatcher sees it; kept across render batches."""

    group: str  # the actor group's name (its loadout's)
    handle: ray.actor.ActorHandle
    worker: str
    holding: AdapterKey = ()  # the per-clip adapters of the last clip sent to it
    # A call that answers once Ray has restarted the actor and its model is loaded again.
    restart: ray.ObjectRef | None = None
    restart_since: float = 0.0
    gone: bool = False  # restarts used up, or a restart that could not be placed

    @property
    def serving(self) -> bool:
        return self.restart is None and not self.gone


class GenerationFleet:
    """Generator actors for some models, and the loop that streams clips through them."""

    def __init__(
        self,
        shape: FleetShape,
        groups: Mapping[str, ActorGroup],
        settings: Settings,
        run_id: str,
        finishing: FinishingContext,
    ) -> None:
        """``shape.actors`` counts actors by group name; ``groups`` says what each group's actors load."""
        self.run_id = run_id
        # Each actor group's model, as the metrics and the manifest name it.
        self.model_names = {
            name: get_model_spec(group.loadout.family, settings.model_variant).name
            for name, group in groups.items()
        }
        self.store_config = settings.object_store()
        self.gpu_prices = settings.gpu_price_per_hour
        self.deadline_factor = settings.clip_deadline_factor
        self.deadline_floor = settings.clip_deadline_floor_seconds
        self.watch_interval = min(WATCH_INTERVAL_MAX_S, self.deadline_floor / 10)
        # The watchdog's registry: no CPU of its own (a few small calls per clip); restarted if it dies.
        self.gpu_holds = (
            ray.remote(GpuHolds)
            .options(
                name=f"{GPU_HOLDS_NAME_PREFIX}{run_id}-{uuid.uuid4().hex[:8]}", num_cpus=0, max_restarts=-1
            )
            .remote()
        )
        self.finishing_budget_bytes = int(
            FINISHING_MEMORY_SHARE * ray.cluster_resources().get("object_store_memory", 0)
        )
        generators = sum(shape.actors.values())
        free_cpus = ray.cluster_resources().get("CPU", 0) - shape.num_cpus * generators
        finisher_count = max(
            1, min(int(free_cpus // settings.finisher_num_cpus), FINISHERS_PER_GENERATOR * generators)
        )
        finisher_class = ray.remote(Finisher).options(
            num_cpus=settings.finisher_num_cpus,
            max_restarts=-1,
            max_task_retries=FINISHER_RETRIES,
        )
        self.finishers = [finisher_class.remote(finishing, run_id) for _ in range(finisher_count)]
        actor_class = ray.remote(GeneratorActor).options(
            num_gpus=shape.num_gpus,
            num_cpus=shape.num_cpus,
            # Ray restarts a dead actor's process, which loads the model again in __init__; an
            # exception raised by __init__ (a broken model) is not retried.
            max_restarts=ACTOR_MAX_RESTARTS,
            max_concurrency=ACTOR_CONCURRENCY,
            # Actors of a model on different nodes when there are several: losing a node then
            # costs a share of each model, and every node's GPUs and store serve clips.
            scheduling_strategy="SPREAD",
        )
        self.actors: dict[str, list[ray.actor.ActorHandle]] = {
            name: [
                actor_class.remote(
                    groups[name].loadout.family,
                    settings.model_variant,
                    settings.model_root,
                    settings.model_cache_dir,
                    settings.device,
                    self.store_config,
                    engine_options(settings, groups[name]),
                    groups[name].loadout.fused_adapters,
                    self.gpu_holds,
                )
                for _ in range(count)
            ]
            for name, count in shape.actors.items()
        }
        # Wait for every model to load, so a broken model is one clear error and not one per clip.
        try:
            loaded = ray.get([actor.loaded.remote() for actors in self.actors.values() for actor in actors])
        except ray.exceptions.RayError as err:
            self.shutdown()
            raise FleetStartError(
                f"generator actors for {', '.join(shape.actors)} failed to load: {err}"
            ) from err
        # Seconds each actor took to load and warm up its model, by worker (restarts not included).
        self.load_seconds = {worker: seconds for worker, seconds, _ in loaded}
        handles = [(name, actor) for name, actors in self.actors.items() for actor in actors]
        self._members = [
            _Member(name, actor, worker)
            for (name, actor), (worker, _, _) in zip(handles, loaded, strict=True)
        ]
        log.info(
            "fleet ready actors=%s load_seconds=%s attention=%s",
            ",".join(self.load_seconds),
            ",".join(f"{seconds:.1f}" for seconds in self.load_seconds.values()),
            ",".join(sorted({attention for _, _, attention in loaded})),
        )

    def run(self, clips: Sequence[ClipSpec]) -> Iterator[ManifestEntry]:
        """Generate, encode and publish ``clips``; yields each clip's manifest entry as it finishes."""
        queues = {name: ClipQueue([c for c in clips if c.loadout.name == name]) for name in self.actors}
        unknown = [c for c in clips if c.loadout.name not in self.actors]
        for clip in unknown:
            yield failed_entry(clip, self.run_id, "generate", f"no actor holds {clip.loadout.name}")
        lost: dict[str, list[str]] = {}  # clip id -> why each of its lost attempts was lost
        timed_out_calls: dict[ray.ObjectRef, str] = {}  # generate calls the watchdog stopped -> why
        watched = time.monotonic()  # when the watchdog last looked at the GPU holds
        in_flight = {id(member): 0 for member in self._members}  # clips sent and not answered yet
        generating: dict[ray.ObjectRef, tuple[ClipSpec, _Member, ray.ObjectRef]] = {}
        finishing: dict[ray.ObjectRef, tuple[ClipSpec, int]] = {}  # -> the clip and its finisher's index
        finisher_load = [0] * len(self.finishers)
        while generating or finishing or any(queues.values()):
            self._give_up_slow_restarts()
            yield from self._fail_orphans(queues, lost)
            # Back-pressure counts the actors that will serve again, restarting ones included.
            floor = FINISHING_PER_ACTOR * sum(not m.gone for m in self._members)
            for member in self._members:
                queue = queues[member.group]
                while (
                    queue
                    and member.serving
                    and in_flight[id(member)] < CLIPS_IN_FLIGHT_PER_ACTOR
                    # While finishers lag, let the actors drain instead of piling up frames.
                    and admits_generation(
                        [s for s, _, _ in generating.values()],
                        [c for c, _ in finishing.values()],
                        queue.peek(member.holding),
                        self.finishing_budget_bytes,
                        floor,
                    )
                ):
                    clip = queue.take(member.holding)
                    metrics.stage_seconds(clip, {"queue_wait": queue.waited(clip)})
                    member.holding = adapter_key(clip)
                    done, frames = member.handle.generate.remote(clip)
                    generating[done] = (clip, member, frames)
                    in_flight[id(member)] += 1
            metrics.clips_in_flight(len(generating), len(finishing))
            if generating and time.monotonic() - watched >= self.watch_interval:
                self._stop_hung_clips(generating, timed_out_calls)
                watched = time.monotonic()
            restarts = {m.restart: m for m in self._members if m.restart is not None}
            if not (generating or finishing or restarts):
                continue  # every queued clip was just failed as an orphan
            ready, _ = ray.wait(
                [*generating, *finishing, *restarts],
                num_returns=1,
                fetch_local=False,
                timeout=self._wait_seconds(watched + self.watch_interval if generating else None),
            )
            for ref in ready:
                if ref in restarts:
                    self._restarted(restarts[ref])
                elif ref in generating:
                    clip, member, frames = generating.pop(ref)
                    stopped = timed_out_calls.pop(ref, None)  # the watchdog's reason, if it stopped it
                    # Answered, by its frames or by the actor's death: its place is free again either way.
                    in_flight[id(member)] -= 1
                    try:
                        ray.get(ref)  # the worker's name, small: the frames stay where they are
                    except GENERATION_LOST as err:
                        self._actor_lost(member, type(err).__name__)
                        self.gpu_holds.released.remote(ref.task_id().hex())  # a dead process never says so
                        reason = stopped or f"{type(err).__name__}: {err}"
                        if entry := self._lost_attempt(clip, reason, queues, lost):
                            yield entry
                        continue
                    except ray.exceptions.RayError as err:
                        if isinstance(err, ray.exceptions.OutOfMemoryError):  # Ray's memory monitor
                            metrics.count(metrics.OUT_OF_MEMORY, model=clip.model.name, where="host")
                        yield failed_entry(clip, self.run_id, "generate", f"{type(err).__name__}: {err}")
                        continue
                    # The frames go from the actor's node to the finisher without passing through here;
                    # the least busy finisher takes them (Ray queues the call while it finishes others).
                    index = min(range(len(self.finishers)), key=finisher_load.__getitem__)
                    finisher_load[index] += 1
                    finishing[self.finishers[index].finish.remote(frames)] = (clip, index)
                else:
                    clip, index = finishing.pop(ref)
                    finisher_load[index] -= 1
                    if entry := self._entry(ref, clip, queues, lost):
                        yield entry
        metrics.clips_in_flight(0, 0)

    def _entry(
        self,
        ref: ray.ObjectRef,
        clip: ClipSpec,
        queues: dict[str, ClipQueue],
        lost: dict[str, list[str]],
    ) -> ManifestEntry | None:
        """The clip's entry from its finisher, priced; None when its frames were lost and it is requeued."""
        try:
            entry = priced(ray.get(ref), self.gpu_prices)
        except GENERATION_LOST as err:
            return self._lost_attempt(clip, f"{type(err).__name__}: {err}", queues, lost)
        except ray.exceptions.RayError as err:
            # The finisher died or raised (not a failure of the clip itself), after Ray's own retries.
            entry = failed_entry(clip, self.run_id, "generate", f"{type(err).__name__}: {err}")
        errors = lost.get(clip.clip_id)
        return replace(entry, attempts=1 + len(errors), retried_after=list(errors)) if errors else entry

    def _lost_attempt(
        self,
        clip: ClipSpec,
        error: str,
        queues: dict[str, ClipQueue],
        lost: dict[str, list[str]],
    ) -> ManifestEntry | None:
        """Queue a clip again after an attempt lost with its actor (for ``error``); once its retries are
        spent, its failure: as timed out when the watchdog stopped the last attempt."""
        errors = lost.setdefault(clip.clip_id, [])
        errors.append(error)
        if retries_lost_attempt(errors):
            log.warning(
                "clip attempt lost with its actor clip_id=%s of=%s attempt=%d error=%s",
                clip.clip_id,
                clip.label,
                len(errors),
                error,
            )
            queues[clip.loadout.name].put_back(clip)
            return None
        reason = (
            error
            if timed_out(error)
            else f"lost with its generator actor on all {len(errors)} attempts; last: {error}"
        )
        log.error("clip failed clip_id=%s of=%s stage=generate reason=%s", clip.clip_id, clip.label, reason)
        return failed_entry(
            clip, self.run_id, "generate", reason, attempts=len(errors), retried_after=errors[:-1]
        )

    def _actor_lost(self, member: _Member, why: str) -> None:
        """Take an actor out of service until Ray has restarted it (its other clips fail the same way)."""
        if member.restart is not None or member.gone:
            return
        log.warning("generator actor lost worker=%s error=%s", member.worker, why)
        metrics.count(metrics.ACTOR_RESTARTS, model=self.model_names[member.group])
        # Retried across the restart, so it answers once the new process has loaded the model, or
        # raises ActorDiedError when the actor is dead for good. Calls sent meanwhile would fail at once.
        member.restart = member.handle.name.options(max_task_retries=-1).remote()
        member.restart_since = time.monotonic()

    def _restarted(self, member: _Member) -> None:
        restart, member.restart = member.restart, None
        try:
            member.worker = ray.get(restart)
        except ray.exceptions.RayError as err:
            member.gone = True
            log.error(
                "generator actor gone worker=%s error=%s", member.worker, f"{type(err).__name__}: {err}"
            )
            return
        member.holding = ()  # a new process: its adapter slot starts empty
        log.info("generator actor restarted worker=%s", member.worker)

    def _stop_hung_clips(
        self,
        generating: Mapping[ray.ObjectRef, tuple[ClipSpec, _Member, ray.ObjectRef]],
        timed_out_calls: dict[ray.ObjectRef, str],
    ) -> None:
        """The watchdog: kill the actors whose clip has held the GPU past its deadline, noting why in
        ``timed_out_calls``. Ray restarts them with their model, and the clip's call then ends as lost with
        its actor. The holds are the registry's: a hung actor is never asked."""
        try:
            holds = ray.get(self.gpu_holds.held.remote(), timeout=GPU_HOLDS_ANSWER_TIMEOUT_S)
        except ray.exceptions.RayError as err:
            log.warning("watchdog: the GPU holds registry did not answer error=%s", type(err).__name__)
            return
        for ref, (clip, member, _) in generating.items():
            hold = holds.get(ref.task_id().hex())
            if hold is None or ref in timed_out_calls or not member.serving:
                continue
            deadline = clip_deadline(clip, self.deadline_factor, self.deadline_floor)
            if hold.seconds <= deadline.seconds:
                continue
            timed_out_calls[ref] = deadline.reason(hold.seconds)
            metrics.count(metrics.CLIP_TIMEOUTS, model=clip.model.name)
            log.error(
                "watchdog: clip held its GPU past its deadline, restarting its actor clip_id=%s of=%s "
                "worker=%s reason=%s",
                clip.clip_id,
                clip.label,
                hold.worker,
                timed_out_calls[ref],
            )
            ray.kill(member.handle, no_restart=False)
            self._actor_lost(member, "timed out")

    def _wait_seconds(self, watch_due: float | None) -> float | None:
        """How long the dispatcher may wait for an answer: until the watchdog's next look (``watch_due``,
        monotonic; None while nothing generates) or the oldest restart is due to be given up."""
        due = [m.restart_since + ACTOR_RESTART_TIMEOUT_S for m in self._members if m.restart is not None]
        if watch_due is not None:
            due.append(watch_due)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _give_up_slow_restarts(self) -> None:
        for member in self._members:
            if (
                member.restart is not None
                and time.monotonic() - member.restart_since > ACTOR_RESTART_TIMEOUT_S
            ):
                log.error("generator actor gone worker=%s error=restart not done in time", member.worker)
                ray.kill(member.handle)
                member.restart, member.gone = None, True

    def _fail_orphans(
        self, queues: dict[str, ClipQueue], lost: dict[str, list[str]]
    ) -> Iterator[ManifestEntry]:
        """Fail the queued clips of groups whose actors are all gone: nothing is left to make them."""
        for name, queue in queues.items():
            if queue and all(m.gone for m in self._members if m.group == name):
                while queue:
                    clip = queue.take(())
                    reason = f"no generator actor of {name} is left: all died and could not be restarted"
                    # A clip queued again after lost attempts: each of them was followed by a retry.
                    errors = lost.get(clip.clip_id)
                    details = {"attempts": len(errors), "retried_after": list(errors)} if errors else {}
                    yield failed_entry(clip, self.run_id, "generate", reason, **details)

    def shutdown(self) -> None:
        for actor in [
            *(a for handles in self.actors.values() for a in handles),
            *self.finishers,
            self.gpu_holds,
        ]:
            ray.kill(actor)
