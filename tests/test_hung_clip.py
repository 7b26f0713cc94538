"""A clip that holds its GPU past its deadline: its actor is restarted, the clip retried once, then failed.

The service tests freeze a generator actor's process (SIGSTOP) while it holds the GPU for a chosen clip: a
hung actor that answers nothing. The watchdog reads the GPU holds from the fleet's registry actor, never
from the frozen actor, kills it (Ray restarts it with its model) and the clip is generated again. The rule
for the deadline and the decision to retry are tested on their own, without services.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from datetime import UTC, datetime

import psutil
import pyarrow as pa
import pytest
import ray

from catalogs.rules import ModelDefaults
from catalogs.schema import CATALOG_SCHEMA, validate_catalog
from infra.processes import wait_until
from tasks.fleet import CLIP_RETRIES, GPU_HOLDS_NAME_PREFIX, retries_lost_attempt
from tasks.metrics import CLIP_TIMEOUTS
from tasks.planning import PlanningRules, plan_clips
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import load_profiles
from tasks.records import ClipSpec, ClipStatus
from tasks.watchdog import GpuHolds, clip_deadline, timed_out
from tests.catalog_upload import upload_catalog
from tests.test_metrics import SCRAPE_DEADLINE_S, scrape
from wan_engine.cost import estimated_gpu_seconds

SERVICES = ("tiny_models", "prefect_server", "ray_cluster")
# The tests' deadline: the floor alone (factor 0), short enough to keep the test quick and longer than
# any unfrozen clip of theirs takes on a loaded 2-core machine.
DEADLINE_FLOOR_SECONDS = 4
# Steps of the clips that get frozen: enough that the clip holds the GPU long enough to be caught doing so.
SLOW_STEPS = 150
QUICK_STEPS = 2


def planned_clip(variant: str, **row: object) -> ClipSpec:
    rules = PlanningRules(
        models=ModelDefaults(variant=variant, text_model="t2v-a14b", image_model="i2v-a14b"),
        profiles=load_profiles(),
        default_profile="standard",
        prompt_policy=PromptPolicy.load(),
    )
    cells = {"sku": "DEADLINE-1", "title": "Mug", "description": "A mug.", "style": "studio"}
    cells |= {"updated_at": datetime(2026, 12, 6, tzinfo=UTC), **row}
    catalog = validate_catalog(pa.Table.from_pylist([cells], schema=CATALOG_SCHEMA))
    plan = plan_clips(catalog, rules, "run-deadline", {}, set())
    assert plan.clips, plan.rejected
    return plan.clips[0]


def test_the_deadline_scales_with_the_clips_estimate_and_has_a_floor():
    clip = planned_clip("full", size="832x480", num_frames=81, steps=40)
    estimate = estimated_gpu_seconds(clip.model, clip.request)
    assert estimate > 100  # a 40-step A14B 480p clip: minutes on one H100
    deadline = clip_deadline(clip, factor=3, floor_seconds=120)
    assert deadline.estimate == estimate and deadline.seconds == 3 * estimate
    # Twice the steps: about twice the deadline (the once-a-clip part does not double).
    longer = clip_deadline(planned_clip("full", size="832x480", num_frames=81, steps=80), 3, 120)
    assert 1.9 * deadline.seconds < longer.seconds < 2 * deadline.seconds
    # Under the floor, the floor.
    quick = planned_clip("full", size="832x480", num_frames=5, steps=2)
    assert 0 < 3 * estimated_gpu_seconds(quick.model, quick.request) < 120
    assert clip_deadline(quick, factor=3, floor_seconds=120).seconds == 120
    assert clip_deadline(clip, factor=0, floor_seconds=7).seconds == 7
    # The reason names the clip, the deadline and how it was reached.
    reason = deadline.reason(held_seconds=deadline.seconds + 4)
    assert timed_out(reason)
    assert reason.startswith(
        f"timed out after {deadline.seconds + 4:.0f} s (deadline for t2v-a14b 832x480 81f 40 steps: "
    )
    assert f"{deadline.seconds:.0f} s, the longer of 3 x its estimated {estimate:.1f} GPU-seconds" in reason
    assert "and the 120 s floor" in reason


def test_a_clip_is_retried_once_after_a_timeout_and_within_the_lost_attempts():
    timeout = "timed out after 130 s (deadline for t2v-a14b 832x480 81f 4 steps: 120 s, ...)"
    died = "ActorDiedError: the actor died unexpectedly"
    assert retries_lost_attempt([timeout])  # the first timeout: one retry
    assert not retries_lost_attempt([timeout, timeout])  # the second: failed
    assert not retries_lost_attempt([died, timeout, timeout])
    assert retries_lost_attempt([died, timeout])
    assert retries_lost_attempt([died] * CLIP_RETRIES)
    assert not retries_lost_attempt([died] * (CLIP_RETRIES + 1))
    assert not timed_out(died)


def test_the_registry_keeps_a_hold_until_it_is_released():
    holds = GpuHolds()
    holds.took("call-1", "clip-1", "SKU-1", "node/gpu0/pid1")
    holds.took("call-2", "clip-2", "SKU-2", "node/gpu1/pid2")
    holds.released("call-1")
    held = holds.held()
    assert list(held) == ["call-2"]
    assert held["call-2"][:3] == ("clip-2", "SKU-2", "node/gpu1/pid2") and held["call-2"].seconds >= 0
    holds.released("call-1")  # twice (the actor's own release, then the dispatcher's): no error


def _pid(worker: str) -> int:
    """The process id in a ``worker`` name, "<node>/<gpu or cpu>/pid<pid>"."""
    return int(worker.rsplit("/pid", 1)[1])


class Freezer(threading.Thread):
    """SIGSTOPs a generator actor's process while it holds its GPU for one of the clips in ``freezes``
    (label -> how many of its attempts to freeze), as the fleet's GPU-holds registry reports it."""

    def __init__(self, freezes: dict[str, int]) -> None:
        super().__init__(name="actor-freezer", daemon=True)
        self.left = dict(freezes)
        self.frozen: list[tuple[str, int]] = []  # (label, pid), in order
        self.stop = threading.Event()
        self.known = set(ray.util.list_named_actors())  # registries of earlier fleets

    def run(self) -> None:
        registry, seen = None, set()
        while not self.stop.is_set() and any(self.left.values()):
            if registry is None:
                names = [n for n in ray.util.list_named_actors() if n.startswith(GPU_HOLDS_NAME_PREFIX)]
                new = [n for n in names if n not in self.known]
                registry = ray.get_actor(new[0]) if new else None
            if registry is not None:
                for call, hold in ray.get(registry.held.remote()).items():
                    if call not in seen and self.left.get(hold.label, 0) > 0:
                        os.kill(_pid(hold.worker), signal.SIGSTOP)
                        seen.add(call)
                        self.left[hold.label] -= 1
                        self.frozen.append((hold.label, _pid(hold.worker)))
            self.stop.wait(0.02)

    def thaw(self) -> None:
        """Stop looking; let any process still frozen go on (the watchdog should have had it killed)."""
        self.stop.set()
        self.join(timeout=10)
        for _, pid in self.frozen:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)


def _run_frozen(catalog_uri: str, freezes: dict[str, int]):
    from flows.nightly import nightly_catalog

    freezer = Freezer(freezes)
    freezer.start()
    try:
        # force: the clips are made in this run even if an earlier run published them.
        state = nightly_catalog(catalog_uri=catalog_uri, force=True, return_state=True)
    finally:
        freezer.thaw()
    return state, freezer


@pytest.fixture
def short_deadlines(monkeypatch):
    monkeypatch.setenv("WANFACTORY_CLIP_DEADLINE_FACTOR", "0")
    monkeypatch.setenv("WANFACTORY_CLIP_DEADLINE_FLOOR_SECONDS", str(DEADLINE_FLOOR_SECONDS))


def _row(sku: str, model: str, steps: int) -> dict:
    return {
        "sku": sku,
        "title": f"Mug {sku}",
        "description": "A speckled enamel mug.",
        "style": "studio",
        "model": model,
        "steps": steps,
    }


@pytest.mark.usefixtures(*SERVICES, "short_deadlines")
def test_a_frozen_actor_is_restarted_and_its_clip_retried_once_then_failed_as_timed_out(store):
    # Two models, so two actors that each make one model's clips: a hung clip first, a quick one behind it.
    # HUNG-ONCE hangs its actor once, HUNG-ALWAYS every time; each actor's story is its own.
    rows = [
        _row("HUNG-ONCE", "t2v-a14b", SLOW_STEPS),
        _row("QUICK-1", "t2v-a14b", QUICK_STEPS),
        _row("HUNG-ALWAYS", "ti2v-5b", SLOW_STEPS),
        _row("QUICK-2", "ti2v-5b", QUICK_STEPS),
    ]
    uri = upload_catalog(store, "catalogs/hung-clips/catalog.parquet", rows, datetime.now(UTC))
    state, freezer = _run_frozen(uri, {"HUNG-ONCE": 1, "HUNG-ALWAYS": 2})
    assert sorted(label for label, _ in freezer.frozen) == ["HUNG-ALWAYS", "HUNG-ALWAYS", "HUNG-ONCE"]
    frozen_pids = {pid for _, pid in freezer.frozen}
    assert not any(map(psutil.pid_exists, frozen_pids)), "a frozen actor's process was not killed"

    # The run goes on: the one clip that hung twice fails it, every other clip is published once.
    assert state.is_failed() and "1 clips failed for the infrastructure" in state.message, state.message
    result = state.result(raise_on_failure=False)
    entries = {e.sku: e for e in result.entries}
    published = ["HUNG-ONCE", "QUICK-1", "QUICK-2"]
    assert [sku for sku, e in sorted(entries.items()) if e.status == ClipStatus.PUBLISHED] == published
    stored = sorted(key for sku in [*published, "HUNG-ALWAYS"] for key in store.list_keys(f"clips/{sku}/"))
    expected = (
        k
        for sku in published
        for k in (entries[sku].clip_key, entries[sku].thumbnail_key, entries[sku].preview_key)
    )
    assert stored == sorted(expected)

    # Hung once: made on the restarted actor at its second try; the first try's timeout is on record.
    hung = entries["HUNG-ONCE"]
    assert hung.attempts == 2 and len(hung.retried_after) == 1, hung
    assert timed_out(hung.retried_after[0]), hung.retried_after
    deadline = f"deadline for t2v-a14b-tiny 96x64 17f {SLOW_STEPS} steps: {DEADLINE_FLOOR_SECONDS} s"
    assert deadline in hung.retried_after[0]
    assert _pid(hung.worker) not in frozen_pids

    # Hung twice: failed as timed out at generate, with its deadline in the reason.
    failed = entries["HUNG-ALWAYS"]
    assert (failed.status, failed.stage, failed.attempts) == (ClipStatus.FAILED, "generate", 2), failed
    assert timed_out(failed.reason) and f"ti2v-5b-tiny 96x64 17f {SLOW_STEPS} steps" in failed.reason
    assert f"and the {DEADLINE_FLOOR_SECONDS} s floor" in failed.reason
    assert len(failed.retried_after) == 1 and timed_out(failed.retried_after[0])

    # The stored manifest records the timeouts.
    manifest = {c["sku"]: c for c in json.loads(store.get_bytes(result.manifest.json_key))["clips"]}
    assert manifest["HUNG-ONCE"]["attempts"] == 2
    assert json.loads(manifest["HUNG-ONCE"]["retried_after"]) == hung.retried_after
    assert (manifest["HUNG-ALWAYS"]["status"], manifest["HUNG-ALWAYS"]["reason"]) == ("failed", failed.reason)
    assert json.loads(manifest["HUNG-ALWAYS"]["retried_after"]) == failed.retried_after

    # Each stopped attempt is counted once in the exported metrics (three: once for HUNG-ONCE, twice for
    # HUNG-ALWAYS; no other test's clip times out in this session's Ray).
    (port,) = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}

    def timeouts() -> float:
        return sum(
            s.value for s in scrape(f"http://127.0.0.1:{port}/metrics").get(CLIP_TIMEOUTS.exported_name, [])
        )

    assert wait_until(lambda: timeouts() >= 3, SCRAPE_DEADLINE_S, interval=1.0), timeouts()
    assert timeouts() == 3
