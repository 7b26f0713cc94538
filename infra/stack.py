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
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from infra.access import READER_UID, apply_reader_access
from infra.object_store_server import (
    CephObjectStore,
    ObjectStoreServerConfig,
    http_ok,
    pid_alive,
    pid_cmdline,
    read_pid_file,
    tail,
    terminate_pid,
)
from infra.objectstore import ObjectStore
from infra.settings import Settings

log = logging.getLogger(__name__)

PREFECT_START_TIMEOUT = 90.0  # the first start migrates a fresh SQLite database
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
_PREFECT_ARGS = ["-m", "prefect", "server", "start"]
# `wanfactory serve` as `python -m flows.serve`: the caller's own interpreter, whatever PATH holds.
_SERVE_ARGS = ["-m", "flows.serve"]
# Its first start imports the engine (torch, diffusers, Ray) before it registers: tens of seconds on 2 cores.
SERVE_START_TIMEOUT = 180.0
# What flows.serve registers (flows.serve.DEPLOYMENTS; not imported: `stack status` needs no Prefect).
SERVED_DEPLOYMENTS = ("nightly-catalog/nightly", "ab-batch/ab", "intake-watcher/intake")

# Starts the server as a grandchild in a session of its own and exits at once: the server is nobody's
# child, so the process that ran `stack up` (a CLI, a test) never has to reap it, and it outlives it.
_DETACH = """\
import subprocess, sys
with open(sys.argv[1], "ab") as out:
    server = subprocess.Popen(
        sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
    )
print(server.pid)
"""


class StackError(RuntimeError):
    """A local stack service could not be started or stopped."""


@dataclass(frozen=True)
class StackStatus:
    object_store_running: bool
    s3_endpoint: str
    prefect_running: bool
    prefect_ui_url: str
    serve_running: bool = False

    @property
    def prefect_api_url(self) -> str:
        """What PREFECT_API_URL must be for flows to report to this server."""
        return f"{self.prefect_ui_url}/api"

    def describe(self) -> str:
        def state(running: bool) -> str:
            return "running" if running else "stopped"

        return (
            f"object store  {state(self.object_store_running):<8} s3 endpoint http://{self.s3_endpoint}\n"
            f"prefect       {state(self.prefect_running):<8} UI {self.prefect_ui_url}\n"
            f"serve         {state(self.serve_running):<8} deployments {', '.join(SERVED_DEPLOYMENTS)}"
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


def stack_up(settings: Settings) -> StackStatus:
    """Start whatever part of the stack is not running, create the bucket if missing, and wait for both.

    Also creates (or updates) the read-only reader user and the bucket policy that keeps it out of
    quarantine/ (infra/access.py); both are no-ops when already in place. Last it starts ``wanfactory
    serve`` against the Prefect server and waits until its deployments are registered, so that the
    nightly schedule runs and a sheet dropped into intake/ starts an A/B run with no terminal open.

    Raises ObjectStoreError or StackError naming the service that failed (with its log); a service that
    did come up is left running, and the next ``stack_up`` reuses it.
    """
    store = object_store(settings)
    # Prefect starts first and comes up while the object store does: they take 5-15 s each.
    prefect_pid = _start_prefect(settings)
    store.start()
    writer = ObjectStore(settings.object_store())
    writer.ensure_bucket()
    # The read-only credential for people, the website and reports: no access to quarantine/.
    reader = settings.reader_store()
    store.ensure_user(
        READER_UID, reader.access_key, reader.secret_key.get_secret_value(), "wanfactory reader (read-only)"
    )
    apply_reader_access(writer.client, settings.s3_bucket, READER_UID)
    _wait_for_prefect(settings, prefect_pid)
    # After the server answers: serving starts by registering the deployments with it.
    launched = _start_serve(settings)
    if launched is not None:
        _wait_for_serve(settings, *launched)
    status = stack_status(settings)
    log.info(
        "stack up s3_endpoint=%s bucket=%s prefect_ui=%s state_dir=%s",
        status.s3_endpoint,
        settings.s3_bucket,
        status.prefect_ui_url,
        settings.state_dir,
    )
    return status


def stack_down(settings: Settings) -> None:
    """Stop ``wanfactory serve``, the Prefect server and the object store (data stays under ``state_dir``)."""
    # Serve first, while the server still answers: stopping, Prefect's runner pauses the deployments
    # there (best effort), so no runs pile up while nothing serves them; the next `stack up` resumes them.
    serve_pid = _serve_pid(settings)
    if serve_pid is not None:
        # The whole process group: the flow runs it started go with it.
        terminate_pid(serve_pid, "wanfactory serve", timeout=30, group=True)
    _serve_pid_file(settings).unlink(missing_ok=True)
    pid = _prefect_pid(settings)
    if pid is not None:
        # The whole process group, so that anything the server spawned goes with it.
        terminate_pid(pid, "prefect server", timeout=30, group=True)
    _prefect_pid_file(settings).unlink(missing_ok=True)
    object_store(settings).stop()
    log.info("stack down state_dir=%s", settings.state_dir)


def stack_status(settings: Settings) -> StackStatus:
    """What answers now: the S3 endpoint (anonymous GET /) and Prefect's /api/health."""
    store = object_store(settings)
    return StackStatus(
        object_store_running=store.is_running(),
        s3_endpoint=store.endpoint,
        prefect_running=_prefect_healthy(settings),
        prefect_ui_url=_prefect_url(settings),
        serve_running=_serve_pid(settings) is not None,
    )


def _launch_detached(argv: list[str], log_path: Path, pid_file: Path, env: dict[str, str], cwd: Path) -> int:
    """Start ``argv`` detached (see _DETACH) with its output in ``log_path``; record and return its pid."""
    launched = subprocess.run(
        [sys.executable, "-c", _DETACH, str(log_path), *argv],
        check=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    pid = int(launched.stdout)
    pid_file.write_text(f"{pid}\n")
    return pid


# -- Prefect server ------------------------------------------------------------------------------------------


def _prefect_home(settings: Settings) -> Path:
    return settings.state_dir / "prefect"


def _prefect_pid_file(settings: Settings) -> Path:
    # Not server.pid: that is `prefect server start --background`'s own file, and its presence makes
    # Prefect misreport a busy port as "a background server is already running".
    return _prefect_home(settings) / "wanfactory-server.pid"


def _prefect_log(settings: Settings) -> Path:
    return _prefect_home(settings) / "server.log"


def _prefect_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prefect_port}"


def _prefect_healthy(settings: Settings) -> bool:
    return http_ok(f"{_prefect_url(settings)}/api/health")


def _prefect_pid(settings: Settings) -> int | None:
    """The pid of our server if it is alive (checked against its argv: a stale pid may be reused)."""
    pid = read_pid_file(_prefect_pid_file(settings))
    if pid is None or not pid_alive(pid):
        return None
    cmdline = pid_cmdline(pid)
    if cmdline[1:5] != _PREFECT_ARGS or cmdline[-1] != str(settings.prefect_port):
        return None
    return pid


def _start_prefect(settings: Settings) -> int | None:
    """Launch the server unless it runs; returns the pid to wait for (None: another server answers)."""
    pid = _prefect_pid(settings)
    if pid is not None:
        return pid
    if _prefect_healthy(settings):
        # Not started by this stack (e.g. a foreground `prefect server start`): use it as it is.
        log.warning(
            "prefect server already answers, not started by this stack url=%s", _prefect_url(settings)
        )
        return None
    home = _prefect_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    argv = [sys.executable, *_PREFECT_ARGS, "--host", "127.0.0.1", "--port", str(settings.prefect_port)]
    # Not the caller's directory: Prefect would read a prefect.toml or .env found there.
    pid = _launch_detached(argv, _prefect_log(settings), _prefect_pid_file(settings), env, cwd=home)
    log.info("prefect server launched pid=%d url=%s home=%s", pid, _prefect_url(settings), home)
    return pid


def _wait_for_prefect(settings: Settings, pid: int | None) -> None:
    deadline = time.monotonic() + PREFECT_START_TIMEOUT
    while not _prefect_healthy(settings):
        exited = pid is not None and not pid_alive(pid)
        if exited or time.monotonic() > deadline:
            url = f"{_prefect_url(settings)}/api/health"
            why = "exited at start" if exited else f"did not answer {url} in {PREFECT_START_TIMEOUT:.0f} s"
            server_log = _prefect_log(settings)
            raise StackError(f"prefect server {why}\n--- {server_log} (tail) ---\n{tail(server_log)}")
        time.sleep(0.5)


# -- wanfactory serve ----------------------------------------------------------------------------------------


def _serve_dir(settings: Settings) -> Path:
    return settings.state_dir / "serve"


def _serve_pid_file(settings: Settings) -> Path:
    return _serve_dir(settings) / "wanfactory-serve.pid"


def _serve_log(settings: Settings) -> Path:
    return _serve_dir(settings) / "serve.log"


def _serve_pid(settings: Settings) -> int | None:
    """The pid of our serve process if it is alive (checked against its argv: a stale pid may be reused)."""
    pid = read_pid_file(_serve_pid_file(settings))
    if pid is None or not pid_alive(pid) or pid_cmdline(pid)[1:] != _SERVE_ARGS:
        return None
    return pid


def _start_serve(settings: Settings) -> tuple[int, datetime] | None:
    """Launch ``wanfactory serve`` unless it runs; returns its pid and launch time, None if it was running."""
    if _serve_pid(settings) is not None:
        return None
    _serve_dir(settings).mkdir(parents=True, exist_ok=True)
    # The package's own checkout first on the path: the serve process and the flow-run subprocesses it
    # starts import the flows by module name, and must get this code whatever directory they run in.
    root = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PREFECT_API_URL": f"{_prefect_url(settings)}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": python_path,
    }
    launched_at = datetime.now(UTC)
    # The caller's directory, as for any wanfactory command: the settings' .env file is read there.
    pid = _launch_detached(
        [sys.executable, *_SERVE_ARGS], _serve_log(settings), _serve_pid_file(settings), env, cwd=Path.cwd()
    )
    log.info(
        "wanfactory serve launched pid=%d api=%s log=%s", pid, env["PREFECT_API_URL"], _serve_log(settings)
    )
    return pid, launched_at


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


def _wait_for_serve(settings: Settings, pid: int, launched_at: datetime) -> None:
    """Wait until the serve process has (re-)registered every deployment; stale ones do not count."""
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    while not all(_registered_since(settings, d, launched_at) for d in SERVED_DEPLOYMENTS):
        exited = not pid_alive(pid)
        if exited or time.monotonic() > deadline:
            why = (
                "exited at start"
                if exited
                else f"did not register {', '.join(SERVED_DEPLOYMENTS)} in {SERVE_START_TIMEOUT:.0f} s"
            )
            serve_log = _serve_log(settings)
            raise StackError(f"wanfactory serve {why}\n--- {serve_log} (tail) ---\n{tail(serve_log)}")
        time.sleep(1.0)
