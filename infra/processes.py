"""Local service processes: detached, found again through pid files, waited for, stopped.

The local stack's services (the Ceph daemons of infra.object_store_server, the Prefect server and
``wanfactory serve`` of infra.stack) outlive the command that started them. A later process finds each
again through its pid file, and trusts a pid only while it names a live process whose command line is
the service's: pid files outlive a SIGKILL, and the kernel reuses pids.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

log = logging.getLogger(__name__)

T = TypeVar("T")

# Starts the service as a grandchild in a session of its own and exits at once: the service is nobody's
# child, so the process that started it (a CLI, a test) never has to reap it, and it outlives it.
_DETACH = """\
import subprocess, sys
with open(sys.argv[1], "ab") as out:
    server = subprocess.Popen(
        sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
    )
print(server.pid)
"""


class ServiceError(RuntimeError):
    """A service process could not be started or stopped."""


def free_ports(count: int) -> list[int]:
    """Distinct free ports from the kernel's ephemeral range, so a running local stack is never in the way.

    The sockets stay open until all are picked, so that the ports differ.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    *,
    alive: Callable[[], bool] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value; return its last value.

    It is called at least once, and once more at the deadline, ``timeout`` seconds from now. Waiting also
    ends early, with the falsy value, as soon as ``alive`` (when given) returns False: the thing waited for
    has died. The predicate may raise to give up at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or (alive is not None and not alive()):
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return value
        time.sleep(min(interval, remaining))


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if an anonymous GET of ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 30, skip: Callable[[str], bool] = lambda line: False) -> str:
    """The last ``lines`` non-blank lines of a log file, leaving out those ``skip`` rejects."""
    try:
        text = path.read_text(errors="replace")
        kept = [line for line in text.splitlines() if line.strip() and not skip(line)]
    except OSError:
        return f"(no {path})"
    return "\n".join(kept[-lines:])


def read_pid_file(path: Path) -> int | None:
    """The pid a pid file holds, or None if there is no file or no number in it."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(process: psutil.Process) -> bool:
    """True while ``process`` runs (a zombie counts as dead; our own zombie child is reaped)."""
    with contextlib.suppress(ChildProcessError):  # not our child: only its parent (or init) reaps it
        os.waitpid(process.pid, os.WNOHANG)
    try:
        # is_running also compares the start time: a pid reused since ``process`` was made is not it.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class Service:
    """A detached process found through ``pid_file``, whose output goes to ``log_path``.

    ``is_ours`` tells from a live pid's command line whether it is this service (rather than an unrelated
    process that got a stale pid). ``error`` is the exception type its failures raise.
    """

    name: str
    pid_file: Path
    log_path: Path
    is_ours: Callable[[list[str]], bool]
    error: type[Exception] = ServiceError

    def pid(self) -> int | None:
        """The pid of the service if it is alive and really ours, else None."""
        process = self._process()
        return None if process is None else process.pid

    def running(self) -> bool:
        return self._process() is not None

    def _process(self) -> psutil.Process | None:
        pid = read_pid_file(self.pid_file)
        if pid is None:
            return None
        try:
            process = psutil.Process(pid)
            if not _alive(process) or not self.is_ours(process.cmdline()):
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return process

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None = None,
        *,
        daemonizes: bool = False,
        timeout: float = 30,
    ) -> int:
        """Start ``argv`` in a session of its own, its output appended to ``log_path``; return its pid.

        By default the process is detached here (see _DETACH) and its pid recorded in ``pid_file``. With
        ``daemonizes`` the program forks into the background and writes ``pid_file`` itself: its launcher
        must exit 0 within ``timeout`` seconds, and the pid file must name a live process of ours by then.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if not daemonizes:
            launched = subprocess.run(
                [sys.executable, "-c", _DETACH, str(self.log_path), *argv],
                check=True,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            pid = int(launched.stdout)
            self.pid_file.write_text(f"{pid}\n")
            return pid
        deadline = time.monotonic() + timeout
        self.pid_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as out:
            try:
                launcher = subprocess.run(
                    list(argv),
                    check=False,
                    env=dict(env),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    timeout=max(timeout, 1),
                )
            except subprocess.TimeoutExpired:
                raise self.failure("its launcher did not return") from None
        if launcher.returncode != 0:
            raise self.failure(f"it exited with status {launcher.returncode}")
        pid = wait_until(self.pid, deadline - time.monotonic())
        if pid is None:
            raise self.failure("it wrote no pid file or died right away")
        return pid

    def wait_ready(
        self,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        interval: float = 0.5,
        watch: bool = True,
    ) -> None:
        """Wait until ``ready()``; raise ``failure`` if the service exits first (``watch``) or it times out.

        ``what`` completes "<name> did not ... in N s": what ``ready`` checks, e.g. "answer URL".
        """
        if wait_until(ready, timeout, interval, alive=self.running if watch else None):
            return
        if watch and not self.running():
            raise self.failure("exited at start")
        raise self.failure(f"did not {what} in {timeout:.0f} s")

    def failure(self, why: str) -> Exception:
        """The error for a start that failed for reason ``why``, with the end of the service's log."""
        return self.error(f"{self.name} {why}\n--- {self.log_path} (tail) ---\n{tail(self.log_path)}")

    def stop(self, timeout: float, group: bool = False) -> None:
        """SIGTERM the service (its whole process group if ``group``), SIGKILL if it outlives ``timeout``.

        A no-op if it is not running. The pid file is removed either way.
        """
        process = self._process()
        if process is not None:
            _terminate(process, self.name, timeout, group, self.error)
        self.pid_file.unlink(missing_ok=True)


def _terminate(
    process: psutil.Process, what: str, timeout: float, group: bool, error: type[Exception]
) -> None:
    pid = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if group:
                # A service started in a session of its own leads its process group: its pgid is its pid.
                os.killpg(pid, sig)
            else:
                process.send_signal(sig)
        except (ProcessLookupError, psutil.NoSuchProcess):
            return
        if wait_until(lambda: not _alive(process), timeout):
            log.info("process stopped what=%s pid=%d signal=%s", what, pid, sig.name)
            return
        log.warning(
            "process ignored signal what=%s pid=%d signal=%s timeout_s=%s", what, pid, sig.name, timeout
        )
    raise error(f"{what} (pid {pid}) survived SIGKILL")
