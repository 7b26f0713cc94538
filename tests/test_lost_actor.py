"""A generator actor's process killed in the middle of a clip: the run still publishes every clip, once.

The nightly flow runs on a small catalog of one model (so one actor) while a thread SIGKILLs the
actor's process as soon as it is generating a clip. Ray restarts the actor with its model, the
dispatcher generates the lost clips again, and the manifest says which clips took two attempts and why.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psutil
import pytest

from flows.nightly import nightly_catalog
from tasks.fleet import CLIPS_IN_FLIGHT_PER_ACTOR
from tasks.records import ClipStatus
from tests.catalog_upload import upload_catalog

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")

SKUS = [f"LOST-{index:03d}" for index in range(6)]
# Ray titles an actor's process "ray::<Class>.<method>" while it runs that method, and "ray::<Class>"
# when idle: the exact moment a clip is being generated, with no reporting delay.
GENERATING = "ray::GeneratorActor.generate"


class ActorKiller(threading.Thread):
    """SIGKILLs a generator actor's process the first time it is seen generating a clip.

    Only processes under this one are looked at: the session's local Ray is started by this
    process (the ``ray_cluster`` fixture), and other Ray clusters on the machine are not ours.
    """

    def __init__(self) -> None:
        super().__init__(name="actor-killer", daemon=True)
        self.killed_pid: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for process in psutil.Process().children(recursive=True):
                try:
                    title = process.cmdline()
                except psutil.Error:  # a worker that exited while we looked
                    continue
                if title[:1] == [GENERATING]:
                    os.kill(process.pid, signal.SIGKILL)
                    self.killed_pid = process.pid
                    return
            self.stop.wait(0.05)


@contextmanager
def an_actor_killed_mid_clip() -> Iterator[ActorKiller]:
    """Runs the block with an :class:`ActorKiller` watching, and checks it killed a generating actor."""
    killer = ActorKiller()
    killer.start()
    try:
        yield killer
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    assert killer.killed_pid is not None, "the generator actor was never seen generating a clip"


def _pid(worker: str) -> int:
    """The process id in a manifest ``worker`` field, "<node>/<gpu or cpu>/pid<pid>"."""
    return int(worker.rsplit("/pid", 1)[1])


@pytest.fixture(scope="module")
def catalog_uri(store) -> str:
    """Six text-to-video products: one model family, so one generator actor serves them all."""
    rows = [
        {
            "sku": sku,
            "title": f"Enamel camp mug {index}",
            "description": "A speckled enamel mug on a wooden table.",
            "style": "studio",
        }
        for index, sku in enumerate(SKUS)
    ]
    return upload_catalog(store, "catalogs/lost-actor/catalog.parquet", rows, datetime.now(UTC))


def test_a_killed_actor_loses_no_clip(catalog_uri, store):
    # force: the clips are made in this run even if an earlier run published them.
    with an_actor_killed_mid_clip() as killer:
        result = nightly_catalog(catalog_uri=catalog_uri, force=True)

    # Every planned clip published exactly once: one entry each, and exactly its own objects in the store.
    entries = result.entries
    assert sorted(e.sku for e in entries) == SKUS
    assert {e.status for e in entries} == {ClipStatus.PUBLISHED}, [
        (e.sku, e.stage, e.reason) for e in entries
    ]
    assert len({e.clip_id for e in entries}) == len(SKUS)
    expected = sorted(key for e in entries for key in (e.clip_key, e.thumbnail_key, e.preview_key))
    stored = sorted(key for sku in SKUS for key in store.list_keys(f"clips/{sku}/"))
    assert stored == expected

    # The killed clip (and the one queued behind it on the same actor) took a second attempt.
    retried = [e for e in entries if e.attempts > 1]
    assert 1 <= len(retried) <= CLIPS_IN_FLIGHT_PER_ACTOR, [(e.sku, e.attempts) for e in entries]
    for entry in retried:
        assert entry.attempts == 2
        assert len(entry.retried_after) == 1
        assert entry.retried_after[0].startswith(("ActorDiedError", "ActorUnavailableError")), (
            entry.retried_after
        )

    # The actor came back as a new process, which made the retried clips and the ones after them.
    pids = {_pid(e.worker) for e in entries}
    assert len(pids - {killer.killed_pid}) == 1, (pids, killer.killed_pid)
    assert all(_pid(e.worker) != killer.killed_pid for e in retried)

    # The stored manifest records the same attempts and errors.
    manifest = json.loads(store.get_bytes(result.manifest.json_key))
    by_sku = {clip["sku"]: clip for clip in manifest["clips"]}
    for entry in entries:
        assert by_sku[entry.sku]["attempts"] == entry.attempts
        assert json.loads(by_sku[entry.sku]["retried_after"]) == entry.retried_after
