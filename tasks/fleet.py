"""The Ray fan-out: generator actors that each pin one GPU, and a dispatcher that streams clips through them.

Ray's batch-inference pattern: :class:`GeneratorActor` loads its Wan2.2 generator
once in ``__init__`` and serves many clips. :class:`GenerationFleet` hands clips to
actors a few at a time (so a slow clip never holds a batch), and as each clip's
frames are ready it starts a CPU task that encodes and publishes them, so finished
clips are post-processed and uploaded while the GPUs generate the next ones.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from catalogs.sources import read_bytes
from infra.objectstore import ObjectStore
from infra.settings import ObjectStoreConfig, Settings
from tasks.publish import finish_clip
from tasks.records import ClipSpec, GeneratedClip, ManifestEntry, failed_entry
from wan_engine import EngineOptions, WanGenerator, get_model_spec, model_location

log = logging.getLogger(__name__)

# Clips queued per actor: one generating and one waiting, so an actor never idles on the driver.
CLIPS_IN_FLIGHT_PER_ACTOR = 2
# Generated clips allowed to wait for encoding, per actor: bounds the frames held in memory.
FINISHING_PER_ACTOR = 2


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
    )


class GeneratorActor:
    """One loaded Wan2.2 generator serving clips; created with ``num_gpus=1`` on GPU clusters."""

    def __init__(
        self,
        family: str,
        variant: str,
        model_root: str,
        cache_dir: Path,
        device: str,
        store_config: ObjectStoreConfig,
        options: EngineOptions,
    ) -> None:
        # Loading bars from many actors interleave into noise in the driver's log.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        spec = get_model_spec(family, variant)
        self.store = ObjectStore(store_config)
        self.generator = WanGenerator.from_pretrained(
            model_location(model_root, spec),
            spec,
            device=device,
            cache_dir=cache_dir,
            client=self.store.client,
            options=options,
        )
        gpus = ray.get_gpu_ids()
        node = ray.get_runtime_context().get_node_id()[:8]
        self.worker = f"{node}/{'gpu' + ','.join(map(str, gpus)) if gpus else 'cpu'}/pid{os.getpid()}"

    def name(self) -> str:
        return self.worker

    def generate(self, spec: ClipSpec) -> GeneratedClip:
        """Frames for one clip, or the error that stopped it (a clip's failure is not the actor's)."""
        try:
            image = self._image(spec) if spec.image_uri else None
            video = self.generator.generate(spec.request(image))
        except Exception as err:
            log.warning("generation failed clip_id=%s error=%s", spec.clip_id, err)
            return GeneratedClip(
                spec,
                None,
                spec.fps,
                0.0,
                {},
                self.worker,
                error=f"{type(err).__name__}: {err}",
                engine_mode=self.generator.options.mode,
            )
        return GeneratedClip(
            spec,
            video.frames,
            video.fps,
            video.seconds,
            video.expert_calls,
            self.worker,
            engine_mode=self.generator.options.mode,
        )

    def _image(self, spec: ClipSpec) -> Image.Image:
        data = read_bytes(spec.image_uri, self.store.client)
        if hashlib.sha256(data).hexdigest() != spec.image_sha256:
            raise ValueError(f"image {spec.image_uri} changed after planning")
        return Image.open(io.BytesIO(data)).convert("RGB")


def engine_options(settings: Settings) -> EngineOptions:
    """The engine's fast exact defaults, plus any approximate mode the settings opt into."""
    return EngineOptions(
        step_cache_interval=settings.engine_step_cache_interval, fp8_matmuls=settings.engine_fp8_matmuls
    )


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


class FleetStartError(RuntimeError):
    """A model could not be loaded on its actors."""


class GenerationFleet:
    """Generator actors for some models, and the loop that streams clips through them."""

    def __init__(self, shape: FleetShape, settings: Settings, run_id: str) -> None:
        self.run_id = run_id
        self.store_config = settings.object_store()
        self.finisher = ray.remote(finish_clip).options(num_cpus=settings.finisher_num_cpus, max_retries=2)
        actor_class = ray.remote(GeneratorActor).options(num_gpus=shape.num_gpus, num_cpus=shape.num_cpus)
        self.actors: dict[str, list[ray.actor.ActorHandle]] = {
            family: [
                actor_class.remote(
                    family,
                    settings.model_variant,
                    settings.model_root,
                    settings.model_cache_dir,
                    settings.device,
                    self.store_config,
                    engine_options(settings),
                )
                for _ in range(count)
            ]
            for family, count in shape.actors.items()
        }
        # Wait for every model to load, so a broken model is one clear error and not one per clip.
        try:
            self.workers = ray.get(
                [actor.name.remote() for actors in self.actors.values() for actor in actors]
            )
        except ray.exceptions.RayError as err:
            self.shutdown()
            raise FleetStartError(
                f"generator actors for {', '.join(shape.actors)} failed to load: {err}"
            ) from err
        log.info("fleet ready actors=%s", ",".join(self.workers))

    def run(self, clips: Sequence[ClipSpec]) -> Iterator[ManifestEntry]:
        """Generate, encode and publish ``clips``; yields each clip's manifest entry as it finishes."""
        queues = {family: deque(c for c in clips if c.family == family) for family in self.actors}
        unknown = [c for c in clips if c.family not in self.actors]
        for spec in unknown:
            yield failed_entry(spec, self.run_id, "generate", f"no actor holds {spec.model}")
        actors = [(family, actor) for family, handles in self.actors.items() for actor in handles]
        in_flight = {id(actor): 0 for _, actor in actors}
        generating: dict[ray.ObjectRef, tuple[ClipSpec, ray.actor.ActorHandle]] = {}
        finishing: dict[ray.ObjectRef, ClipSpec] = {}
        finishing_limit = FINISHING_PER_ACTOR * len(actors)
        while generating or finishing or any(queues.values()):
            for family, actor in actors:
                while (
                    queues[family]
                    and in_flight[id(actor)] < CLIPS_IN_FLIGHT_PER_ACTOR
                    # Back-pressure: while encoders lag, let the actors drain instead of piling up frames.
                    and len(finishing) < finishing_limit
                ):
                    spec = queues[family].popleft()
                    generating[actor.generate.remote(spec)] = (spec, actor)
                    in_flight[id(actor)] += 1
            ready, _ = ray.wait([*generating, *finishing], num_returns=1, fetch_local=False)
            for ref in ready:
                if ref in generating:
                    spec, actor = generating.pop(ref)
                    in_flight[id(actor)] -= 1
                    # The frames go from the actor's node to the finisher without passing through here.
                    finishing[self.finisher.remote(ref, self.store_config, self.run_id)] = spec
                else:
                    yield self._entry(ref, finishing.pop(ref))

    def _entry(self, ref: ray.ObjectRef, spec: ClipSpec) -> ManifestEntry:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as err:
            # The actor or the finisher died (not a failure of the clip itself).
            return failed_entry(spec, self.run_id, "generate", f"{type(err).__name__}: {err}")

    def shutdown(self) -> None:
        for handles in self.actors.values():
            for actor in handles:
                ray.kill(actor)
