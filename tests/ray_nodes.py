"""Ray nodes started with `ray start`, as an operator starts them on machines of a cluster.

Each node gets its own ports, temp dir and process group, so that several nodes (and other Ray
instances of the suite) share this machine without colliding, and stopping one stops only its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infra.processes import free_ports, wait_until

# Every port a node listens on besides the head's GCS and client ports.
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
)
# A port picked free can be taken by another process's outgoing connection before the node binds it,
# and the node then exits: such a start is retried on fresh ports.
START_ATTEMPTS = 3
START_TIMEOUT_S = 90


def ray_env() -> dict[str, str]:
    """This process's environment (with the session's WANFACTORY_* settings) for a local, token-less Ray."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A temp dir under /tmp with a short path.

    Ray puts its Unix sockets under `<temp dir>/session_<date>_<pid>/sockets/`, and a socket path may
    not exceed 107 bytes: pytest's own temp dirs leave too little room for that.
    """
    with tempfile.TemporaryDirectory(prefix="wf-ray-", dir="/tmp", ignore_cleanup_errors=True) as path:
        yield Path(path)


class RayNode:
    """One `ray start --block` process; its output goes to `ray-start.log` in its temp dir."""

    def __init__(self, temp_dir: Path, *flags: str, num_cpus: int = 1, object_store_bytes: int = 300_000_000):
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = temp_dir
        self.log_path = temp_dir / "ray-start.log"
        ports = free_ports(len(NODE_PORT_FLAGS))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "ray",
                    "start",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--num-cpus={num_cpus}",
                    f"--object-store-memory={object_store_bytes}",
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                    *flags,
                    *(f"{flag}={port}" for flag, port in zip(NODE_PORT_FLAGS, ports, strict=True)),
                ],
                env=ray_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of `ray start`'s output and of the session's record of processes that exited."""
        exits = self.temp_dir / "session_latest" / "logs" / "ray_process_exit.log"
        parts = [
            path.read_text(errors="replace")[-chars:] for path in (self.log_path, exits) if path.exists()
        ]
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the node's process group (`ray stop` would stop every Ray on the machine, others' included).

        Some Ray processes ignore SIGTERM, and a head's `ray start --block` at times waits on them
        for good: SIGKILL what is left after a short grace period.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)


def _cluster_answers(address: str) -> bool:
    return (
        subprocess.run(
            ["ray", "status", f"--address={address}"], env=ray_env(), capture_output=True
        ).returncode
        == 0
    )


def start_head(
    temp_root: Path, *, num_cpus: int = 1, object_store_bytes: int = 300_000_000
) -> tuple[str, RayNode]:
    """A head node that answers `ray status`, and its address.

    A head that exits while starting is retried on fresh ports; AssertionError with each attempt's output
    when none came up.
    """
    failures = []
    for attempt in range(START_ATTEMPTS):
        gcs_port, client_port = free_ports(2)
        address = f"127.0.0.1:{gcs_port}"
        head = RayNode(
            temp_root / f"head{attempt}",
            "--head",
            f"--port={gcs_port}",
            f"--ray-client-server-port={client_port}",
            "--include-dashboard=false",
            num_cpus=num_cpus,
            object_store_bytes=object_store_bytes,
        )
        if wait_until(functools.partial(_cluster_answers, address), START_TIMEOUT_S, 1, alive=head.alive):
            return address, head
        failures.append(f"attempt {attempt + 1} (exit code {head.process.poll()}):\n{head.log_tail()}")
        head.stop()
    raise AssertionError("the ray head did not come up:\n" + "\n".join(failures))


# Waits until the cluster has the given number of live nodes, then prints their ids (a driver of its own:
# ray.nodes() needs one).
_WAIT_FOR_NODES = """
import json, sys, time, ray
address, at_least, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False)
def alive():
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]
deadline = time.monotonic() + wait_s
while len(alive()) < at_least and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps(alive()))
"""


def live_node_ids(address: str, at_least: int = 1, wait_s: float = 0) -> set[str]:
    """The ids of the cluster's live nodes, after waiting up to `wait_s` for `at_least` of them."""
    listed = subprocess.run(
        [sys.executable, "-c", _WAIT_FOR_NODES, address, str(at_least), str(wait_s)],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=wait_s + 60,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    return set(json.loads(listed.stdout.strip().splitlines()[-1]))


def join_worker(temp_root: Path, address: str) -> RayNode:
    """A worker node joined to the head at `address`; retried on fresh ports if it exits before it joins."""
    nodes_before = len(live_node_ids(address))
    failures = []
    for attempt in range(START_ATTEMPTS):
        worker = RayNode(temp_root / f"worker{attempt}", f"--address={address}")
        if worker.alive() and len(live_node_ids(address, nodes_before + 1, START_TIMEOUT_S)) > nodes_before:
            return worker
        failures.append(f"attempt {attempt + 1} (exit code {worker.process.poll()}):\n{worker.log_tail()}")
        worker.stop()
    raise AssertionError("the worker node did not join the head:\n" + "\n".join(failures))
