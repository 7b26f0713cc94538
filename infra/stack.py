"""The local stack behind ``wanfactory stack up``: the Ceph object store, a Prefect server, and
``wanfactory serve`` (the nightly schedule, the A/B deployment and the intake watcher, flows/serve.py).

All bind 127.0.0.1 and keep running after the command that started them exits; ``stack_down`` (from any
later process) stops them through their pid files. All state lives under ``settings.state_dir``::

    s3/        the object store (see infra.object_store_server)
    prefect/   PREFECT_HOME of the server: its SQLite database, wanfactory-server.pid and server.log
    serve/     wanfactory-serve.pid and serve.log of the process that serves the deployments

Every function is idempotent: ``stack_up`` on a running stack only checks it (and the bucket).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from infra.access import READER_UID, apply_reader_access
from infra.object_store_server import CephObjectStore, ObjectStoreServerConfig
from infra.objectstore import ObjectStore
from infra.processes import Service, ServiceError, http_ok
from infra.settings import ObjectStoreConfig, Settings

log = logging.getLogger(__name__)

PREFECT_START_TIMEOUT = 90.0  # the first start migrates a fresh SQLite database
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
_PREFECT_ARGS = ["-m", "prefect", "server", "start"]
# `wanfactory serve` as `python -m flows.serve`: the caller's own interpreter, whatever PATH holds.
_SERVE_ARGS = ["-m", "flows.serve"]
# Its first start imports the engine (torch, diffusers, Ray) before it registers: tens of seconds on 2 cores.
SERVE_START_TIMEOUT = 180.0


class StackError(ServiceError):
    """A local stack service could not be started or stopped."""


@dataclass(frozen=True)
class StackStatus:
    object_store_running: bool
    s3_endpoint: str
    prefect_running: bool
    prefect_ui_url: str
    serve_running: bool = False
    deployments: tuple[str, ...] = ()  # what serve serves, as its caller names them

    def describe(self) -> str:
        def state(running: bool) -> str:
            return "running" if running else "stopped"

        return (
            f"object store  {state(self.object_store_running):<8} s3 endpoint http://{self.s3_endpoint}\n"
            f"prefect       {state(self.prefect_running):<8} UI {self.prefect_ui_url}\n"
            f"serve         {state(self.serve_running):<8} deployments {', '.join(self.deployments)}"
        )


def object_store(settings: Settings) -> CephObjectStore:
    """The local object store that serves ``settings.s3_endpoint``."""
    host, _, port = settings.s3_endpoint.rpartition(":")
    if host not in _LOCAL_HOSTS or not port.isdigit():
        raise ValueError(
            f"the local stack serves S3 on 127.0.0.1:PORT, but s3_endpoint is {settings.s3_endpoint!r}: "
            "set WANFACTORY_S3_ENDPOINT=127.0.0.1:7480 (or another port) to use it"
        )
    if settings.s3_secure:
        raise ValueError("the local stack serves S3 over plain HTTP: set WANFACTORY_S3_SECURE=false")
    return CephObjectStore(
        ObjectStoreServerConfig(
            data_dir=settings.state_dir / "s3",
            s3_port=int(port),
            mon_port=settings.ceph_mon_port,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
        )
    )


def stack_up(settings: Settings, deployments: Sequence[str]) -> StackStatus:
    """Start whatever part of the stack is not running, create the bucket if missing, and wait for both.

    Also creates (or updates) the read-only reader user and the bucket policy that keeps it out of
    quarantine/ (infra/access.py); both are no-ops when already in place. Last it starts ``wanfactory
    serve`` against the Prefect server and waits until ``deployments`` (what it serves) are registered,
    so that the nightly schedule runs and a sheet dropped into intake/ starts an A/B run with no
    terminal open.

    Raises ObjectStoreError or StackError naming the service that failed (with its log); a service that
    did come up is left running, and the next ``stack_up`` reuses it.
    """
    store = object_store(settings)
    # Prefect starts first and comes up while the object store does: they take 5-15 s each.
    prefect_launched = _start_prefect(settings)
    store.start()
    writer = ObjectStore(settings.object_store())
    writer.ensure_bucket()
    # The read-only credential for people, the website and reports: no access to quarantine/.
    ensure_reader(store, settings.reader_store())
    apply_reader_access(writer.client, settings.s3_bucket, READER_UID)
    _wait_for_prefect(settings, watch=prefect_launched)
    # After the server answers: serving starts by registering the deployments with it.
    launched_at = _start_serve(settings)
    if launched_at is not None:
        _wait_for_serve(settings, launched_at, deployments)
    status = stack_status(settings, deployments)
    log.info(
        "stack up s3_endpoint=%s bucket=%s prefect_ui=%s state_dir=%s",
        status.s3_endpoint,
        settings.s3_bucket,
        status.prefect_ui_url,
        settings.state_dir,
    )
    return status


def ensure_reader(server: CephObjectStore, reader: ObjectStoreConfig) -> None:
    """The reader's user on the local object store: its one key pair, and no bucket of its own (what it may
    read in the pipeline's bucket is the bucket policy's, :func:`infra.access.apply_reader_access`)."""
    secret = reader.secret_key.get_secret_value()
    server.ensure_user(
        READER_UID, reader.access_key, secret, "wanfactory reader (read-only)", may_create_buckets=False
    )


def stack_down(settings: Settings) -> None:
    """Stop ``wanfactory serve``, the Prefect server and the object store (data stays under ``state_dir``)."""
    # Serve first, while the server still answers: stopping, Prefect's runner pauses the deployments
    # there (best effort), so no runs pile up while nothing serves them; the next `stack up` resumes them.
    # Each with its whole process group: the flow runs serve started, and anything the server spawned,
    # go with it.
    _serve(settings).stop(timeout=30, group=True)
    _prefect(settings).stop(timeout=30, group=True)
    object_store(settings).stop()
    log.info("stack down state_dir=%s", settings.state_dir)


def stack_status(settings: Settings, deployments: Sequence[str] = ()) -> StackStatus:
    """What answers now: the S3 endpoint (anonymous GET /) and Prefect's /api/health."""
    store = object_store(settings)
    return StackStatus(
        object_store_running=store.is_running(),
        s3_endpoint=store.endpoint,
        prefect_running=_prefect_healthy(settings),
        prefect_ui_url=_prefect_url(settings),
        serve_running=_serve(settings).running(),
        deployments=tuple(deployments),
    )


# -- Prefect server ------------------------------------------------------------------------------------------


def _prefect_home(settings: Settings) -> Path:
    return settings.state_dir / "prefect"


def _prefect(settings: Settings) -> Service:
    """Our Prefect server, recognised by its argv (a stale pid may be reused)."""
    port = str(settings.prefect_port)

    def is_ours(cmdline: list[str]) -> bool:
        return cmdline[1:5] == _PREFECT_ARGS and cmdline[-1:] == [port]

    return Service(
        "prefect server",
        # Not server.pid: that is `prefect server start --background`'s own file, and its presence makes
        # Prefect misreport a busy port as "a background server is already running".
        pid_file=_prefect_home(settings) / "wanfactory-server.pid",
        log_path=_prefect_home(settings) / "server.log",
        is_ours=is_ours,
        error=StackError,
    )


def _prefect_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prefect_port}"


def _prefect_healthy(settings: Settings) -> bool:
    return http_ok(f"{_prefect_url(settings)}/api/health")


def _start_prefect(settings: Settings) -> bool:
    """Launch the server unless it runs; returns whether it is ours to watch (False: another one answers)."""
    server = _prefect(settings)
    if server.running():
        return True
    if _prefect_healthy(settings):
        # Not started by this stack (e.g. a foreground `prefect server start`): use it as it is.
        log.warning(
            "prefect server already answers, not started by this stack url=%s", _prefect_url(settings)
        )
        return False
    home = _prefect_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The address the alerts' links to a run's page use (flows/automations.py).
        "PREFECT_UI_URL": _prefect_url(settings),
    }
    argv = [sys.executable, *_PREFECT_ARGS, "--host", "127.0.0.1", "--port", str(settings.prefect_port)]
    # Not the caller's directory: Prefect would read a prefect.toml or .env found there.
    pid = server.start(argv, env, cwd=home)
    log.info("prefect server launched pid=%d url=%s home=%s", pid, _prefect_url(settings), home)
    return True


def _wait_for_prefect(settings: Settings, watch: bool) -> None:
    """Wait until the server answers; with ``watch``, fail as soon as our server process exits."""
    _prefect(settings).wait_ready(
        lambda: _prefect_healthy(settings),
        PREFECT_START_TIMEOUT,
        f"answer {_prefect_url(settings)}/api/health",
        watch=watch,
    )


# -- wanfactory serve ----------------------------------------------------------------------------------------


def _serve(settings: Settings) -> Service:
    """Our ``wanfactory serve`` process, recognised by its argv (a stale pid may be reused)."""
    serve_dir = settings.state_dir / "serve"
    return Service(
        "wanfactory serve",
        pid_file=serve_dir / "wanfactory-serve.pid",
        log_path=serve_dir / "serve.log",
        is_ours=lambda cmdline: cmdline[1:] == _SERVE_ARGS,
        error=StackError,
    )


def _start_serve(settings: Settings) -> datetime | None:
    """Launch ``wanfactory serve`` unless it runs; returns its launch time, None if it was running."""
    serve = _serve(settings)
    if serve.running():
        return None
    # The package's own checkout first on the path: the serve process and the flow-run subprocesses it
    # starts import the flows by module name, and must get this code whatever directory they run in.
    root = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PREFECT_API_URL": f"{_prefect_url(settings)}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": python_path,
        # The flow runs' heartbeat, for Prefect to read as it is imported; serve applies the automation
        # that marks a run Crashed when its heartbeats stop.
        **settings.prefect_environment(),
    }
    launched_at = datetime.now(UTC)
    # The caller's directory, as for any wanfactory command: the settings' .env file is read there.
    pid = serve.start([sys.executable, *_SERVE_ARGS], env, cwd=Path.cwd())
    log.info("wanfactory serve launched pid=%d api=%s log=%s", pid, env["PREFECT_API_URL"], serve.log_path)
    return launched_at


def _registered_since(settings: Settings, deployment: str, since: datetime) -> bool:
    """Whether the server holds ``deployment`` ("flow/name"), written at or after ``since``."""
    url = f"{_prefect_url(settings)}/api/deployments/name/{deployment}"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            updated = datetime.fromisoformat(json.load(response)["updated"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return False
    # One second of slack: the server stores the time it handled the request, on this same clock.
    return updated >= since - timedelta(seconds=1)


def _wait_for_serve(settings: Settings, launched_at: datetime, deployments: Sequence[str]) -> None:
    """Wait until the serve process has (re-)registered every deployment; stale ones do not count."""
    _serve(settings).wait_ready(
        lambda: all(_registered_since(settings, d, launched_at) for d in deployments),
        SERVE_START_TIMEOUT,
        f"register {', '.join(deployments)}",
        interval=1.0,
    )
