"""A real S3 server for local runs and tests: a one-node Ceph cluster (mon, bluestore osd, radosgw).

MinIO's server is in no registry reachable here and moto accepts any credentials, so the local stack runs
Debian's Ceph instead: it checks signatures, expires presigned URLs and keeps objects across restarts.
Everything the cluster owns (conf, keyrings, mon/osd/rgw data, logs, pid files, admin sockets) lives under
``ObjectStoreServerConfig.data_dir``, and every daemon listens on 127.0.0.1 only.

Layout of the data directory::

    ceph.conf keyring cluster.json   conf, the mon. key, facts fixed at mkfs (fsid, mon port, key hash)
    mon/ osd/ rgw/                   daemon data; osd/osd.0/block is the sparse bluestore device
    run/                             pid files and admin sockets
    log/                             per daemon: its log (``*.log``), what its launcher printed (``*.out``)
    .lock                            held while starting or stopping, so two processes never race

The daemons daemonize themselves after being launched in a session of their own, so they outlive the
process that started them; a later process finds them again through the pid files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.processes import Service, ServiceError, http_ok, tail, wait_until

log = logging.getLogger(__name__)

APT_PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")
REQUIRED_BINARIES = (
    "ceph-mon",
    "ceph-osd",
    "radosgw",
    "radosgw-admin",
    "ceph",
    "ceph-authtool",
    "monmaptool",
)
S3_UID = "wanfactory"
# Unix socket paths are limited to 108 bytes; the longest one is run/client.rgw.a.asok.
_MAX_RUN_DIR_LEN = 80


# What RGW gives a user unless told otherwise; -1 refuses the user any bucket of its own.
RGW_DEFAULT_MAX_BUCKETS = 1000


class ObjectStoreError(ServiceError):
    """The object store could not be set up, started or stopped."""


@dataclass(frozen=True)
class ObjectStoreServerConfig:
    data_dir: Path
    s3_port: int
    mon_port: int
    access_key: str
    secret_key: str
    osd_size_bytes: int = 10 * 2**30  # sparse: only written blocks take disk space

    def __post_init__(self) -> None:
        if self.s3_port == self.mon_port:
            raise ValueError(f"s3_port and mon_port must differ, both are {self.s3_port}")

    def __repr__(self) -> str:  # the dataclass repr would print the secret key
        return (
            f"ObjectStoreServerConfig(data_dir={self.data_dir!r}, s3_port={self.s3_port}, "
            f"mon_port={self.mon_port}, access_key={self.access_key!r}, secret_key='**********', "
            f"osd_size_bytes={self.osd_size_bytes})"
        )


@dataclass(frozen=True)
class _Daemon:
    """One Ceph daemon: its binary, its Ceph name and the arguments that select it."""

    binary: str
    name: str
    args: tuple[str, ...]


# In start order; stop goes in reverse (rgw, osd, mon): other stop orders hang.
_MON = _Daemon("ceph-mon", "mon.a", ("-i", "a"))
_OSD = _Daemon("ceph-osd", "osd.0", ("-i", "0"))
_RGW = _Daemon("radosgw", "client.rgw.a", ("-n", "client.rgw.a"))
_DAEMONS = (_MON, _OSD, _RGW)


def _rocksdb_noise(line: str) -> bool:
    # A daemon that exits dumps pages of rocksdb statistics: keep only Ceph's own timestamped lines.
    return not line[:4].isdigit() or " rocksdb: " in line


@dataclass(frozen=True, kw_only=True)
class _DaemonProcess(Service):
    """A daemon of one cluster: its launcher's output in ``log_path`` (``*.out``), its own log beside it."""

    binary: str
    daemon_log: Path
    data_dir: Path

    def failure(self, why: str) -> ObjectStoreError:
        return ObjectStoreError(
            f"object store: {self.binary} ({self.name}) failed to start: {why}; data in {self.data_dir}\n"
            f"--- {self.log_path} (tail) ---\n{tail(self.log_path)}\n"
            f"--- {self.daemon_log} (tail) ---\n{tail(self.daemon_log, skip=_rocksdb_noise)}"
        )


class CephObjectStore:
    """A one-node Ceph cluster serving S3 on 127.0.0.1, with all its state under ``config.data_dir``."""

    def __init__(self, config: ObjectStoreServerConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.conf_path = self.data_dir / "ceph.conf"
        self.keyring_path = self.data_dir / "keyring"
        self.state_path = self.data_dir / "cluster.json"
        self.run_dir = self.data_dir / "run"
        self.log_dir = self.data_dir / "log"
        if len(str(self.run_dir)) > _MAX_RUN_DIR_LEN:
            raise ObjectStoreError(
                f"data_dir {self.data_dir} is too long: admin socket paths under it would exceed the "
                f"108-byte unix socket limit; use a path under {_MAX_RUN_DIR_LEN - 4} characters"
            )
        self._processes = {daemon: self._daemon_process(daemon) for daemon in _DAEMONS}

    def _daemon_process(self, daemon: _Daemon) -> _DaemonProcess:
        conf = str(self.conf_path)

        def is_ours(cmdline: list[str]) -> bool:
            return bool(cmdline) and Path(cmdline[0]).name == daemon.binary and conf in cmdline

        return _DaemonProcess(
            name=daemon.name,
            # Written by the daemon itself (the conf's pid file), once it forked into the background.
            pid_file=self.run_dir / f"{daemon.name}.pid",
            log_path=self.log_dir / f"{daemon.name}.out",
            is_ours=is_ours,
            error=ObjectStoreError,
            binary=daemon.binary,
            daemon_log=self.log_dir / f"{daemon.name}.log",
            data_dir=self.data_dir,
        )

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.config.s3_port}"

    def is_running(self) -> bool:
        """True if radosgw answers an anonymous ``GET /`` with 200 (ready to serve S3)."""
        return http_ok(f"http://{self.endpoint}/")

    def start(self, timeout: float = 90) -> None:
        """Start the cluster, creating it on the first call; a no-op if it already runs and answers."""
        _check_binaries()
        with self._locked():
            if self._all_daemons_alive() and self.is_running():
                log.info("object store already running endpoint=%s", self.endpoint)
                return
            if any(process.running() for process in self._processes.values()):
                # Half a cluster (e.g. after a crash): restart all of it so the start order holds.
                log.warning("object store partly running, restarting data_dir=%s", self.data_dir)
                self._stop(timeout=30)
            if self.is_running():
                raise ObjectStoreError(
                    f"another server already answers on {self.endpoint}; pick another port"
                )
            began = time.monotonic()
            deadline = began + timeout
            state = self._read_state()
            try:
                if state is None:
                    self._create(deadline)
                else:
                    self._restart(state, deadline)
            except BaseException:
                # Leave nothing half-started behind: the error already carries the failing daemon's log.
                self._stop(timeout=30)
                raise
            log.info(
                "object store started endpoint=%s first_start=%s seconds=%.1f data_dir=%s",
                self.endpoint,
                state is None,
                time.monotonic() - began,
                self.data_dir,
            )

    def stop(self, timeout: float = 30) -> None:
        """Stop rgw, then osd, then mon: SIGTERM, then SIGKILL after ``timeout`` seconds each."""
        if not self.data_dir.is_dir():
            return
        with self._locked():
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        for daemon in reversed(_DAEMONS):
            self._processes[daemon].stop(timeout)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize start and stop across processes (two ``stack up`` at once would mkfs twice)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def ensure_user(
        self,
        uid: str,
        access_key: str,
        secret_key: str,
        display_name: str,
        *,
        may_create_buckets: bool = True,
    ) -> None:
        """Make ``uid`` an S3 user whose one S3 key is this pair: create it, or fix an existing one.

        ``may_create_buckets=False`` sets RGW's max-buckets to -1, which refuses the user any bucket of
        its own (a bucket policy can deny writes into existing buckets, not the creation of new ones).

        Idempotent, and cheap when nothing changed (two radosgw-admin calls, ~0.1 s each). Other access
        keys of the user are removed, so a rotated credential stops working at once. The cluster must run.
        """
        # radosgw-admin takes keys only as arguments: they are briefly visible in /proc to local users.
        secret = f"--secret-key={secret_key}"
        keys = (f"--access-key={access_key}", secret)
        max_buckets = RGW_DEFAULT_MAX_BUCKETS if may_create_buckets else -1
        with self._locked():  # two `stack up` at once would both try to create the user
            if uid not in json.loads(self._radosgw_admin("user", "list")):
                self._run(
                    "radosgw-admin",
                    "-c",
                    str(self.conf_path),
                    "user",
                    "create",
                    f"--uid={uid}",
                    f"--display-name={display_name}",
                    f"--max-buckets={max_buckets}",
                    *keys,
                    secret_args=(secret,),
                )
                log.info("object store user created uid=%s access_key=%s", uid, access_key)
                return
            # The info holds the secrets: it is only compared here, never logged.
            info = json.loads(self._radosgw_admin("user", "info", f"--uid={uid}"))
            if info["display_name"] != display_name or info["max_buckets"] != max_buckets:
                self._radosgw_admin(
                    "user",
                    "modify",
                    f"--uid={uid}",
                    f"--display-name={display_name}",
                    f"--max-buckets={max_buckets}",
                )
            current = {key["access_key"]: key["secret_key"] for key in info["keys"]}
            if current == {access_key: secret_key}:
                return
            if current.get(access_key) != secret_key:
                # key create replaces the secret of an access key the user already has.
                self._run(
                    "radosgw-admin",
                    "-c",
                    str(self.conf_path),
                    "key",
                    "create",
                    f"--uid={uid}",
                    "--key-type=s3",
                    *keys,
                    secret_args=(secret,),
                )
            for old in current.keys() - {access_key}:
                self._radosgw_admin("key", "rm", f"--uid={uid}", "--key-type=s3", f"--access-key={old}")
            log.info("object store user key replaced uid=%s access_key=%s", uid, access_key)

    # -- setup ---------------------------------------------------------------------------------------------

    def _create(self, deadline: float) -> None:
        """mkfs of mon and osd, first start, and the S3 user: the cluster.json marker is written last."""
        # A first setup that died half way left a cluster we cannot trust: clear only what we create.
        for name in ("mon", "osd", "rgw", "run", "ceph.conf", "keyring", "monmap"):
            path = self.data_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        fsid = str(uuid.uuid4())
        for sub in ("mon/mon.a", "osd/osd.0", "rgw", "run", "log", "crash"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf(fsid)
        log.info("object store mkfs data_dir=%s fsid=%s", self.data_dir, fsid)
        monmap = self.data_dir / "monmap"
        self._run(
            "ceph-authtool",
            "--create-keyring",
            str(self.keyring_path),
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
            "--log-file=/dev/null",  # as "mon." it would pick up the [mon] log file and leave log/mon..log
        )
        self._run(
            "monmaptool",
            "--create",
            "--fsid",
            fsid,
            "--addv",
            "a",
            f"[v1:127.0.0.1:{self.config.mon_port}]",
            str(monmap),
        )
        self._run(
            "ceph-mon",
            "-c",
            str(self.conf_path),
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            str(monmap),
            "--keyring",
            str(self.keyring_path),
        )
        self._launch(_MON, deadline)
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "create", osd_uuid, deadline=deadline).strip()
        if osd_id != "0":
            raise ObjectStoreError(f"expected the new cluster's first osd to be osd.0, got {osd_id!r}")
        self._run(
            "ceph-osd",
            "-c",
            str(self.conf_path),
            "-i",
            "0",
            "--mkfs",
            "--osd-uuid",
            osd_uuid,
            timeout=max(deadline - time.monotonic(), 1),
        )
        # Placed once, here: the conf turns off the OSD's own crush update at each start.
        self._ceph("osd", "crush", "add", "osd.0", "1.0", "host=localhost", "root=default", deadline=deadline)
        self._launch(_OSD, deadline)
        self._launch(_RGW, deadline)
        self._wait_ready(deadline)
        self._radosgw_admin(
            "user", "create", f"--uid={S3_UID}", "--display-name=wanfactory local stack", with_keys=True
        )
        self._write_state({"fsid": fsid, "mon_port": self.config.mon_port, "key": self._key_fingerprint()})

    def _restart(self, state: dict[str, object], deadline: float) -> None:
        if state["mon_port"] != self.config.mon_port:
            # The mon address is baked into the monmap at mkfs; changing it needs a monmap edit.
            raise ObjectStoreError(
                f"the object store in {self.data_dir} was created with mon port {state['mon_port']}, "
                f"not {self.config.mon_port}; use that port or a fresh data directory"
            )
        self._write_conf(str(state["fsid"]))  # the S3 port may have changed since mkfs
        for daemon in _DAEMONS:
            self._launch(daemon, deadline)
        self._wait_ready(deadline)
        if state.get("key") != self._key_fingerprint():
            # The settings' keys changed since mkfs: give the S3 user the new pair, drop the old one.
            old = self._radosgw_admin("user", "info", f"--uid={S3_UID}")
            # key create replaces the secret of an existing access key, so only other access keys go.
            self._radosgw_admin("key", "create", f"--uid={S3_UID}", "--key-type=s3", with_keys=True)
            for key in json.loads(old)["keys"]:
                if key["access_key"] != self.config.access_key:
                    self._radosgw_admin(
                        "key", "rm", f"--uid={S3_UID}", "--key-type=s3", f"--access-key={key['access_key']}"
                    )
            self._write_state({**state, "key": self._key_fingerprint()})
            log.info("object store s3 key replaced access_key=%s", self.config.access_key)

    def _write_conf(self, fsid: str) -> None:
        d = self.data_dir
        # Tuned for a 2-core dev box: one replica, few PGs, a small bluestore cache.
        conf = f"""\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{self.config.mon_port}
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon cluster log to file = false
ms bind ipv4 = true
ms bind ipv6 = false
run dir = {d}/run
crash dir = {d}/crash
keyring = {self.keyring_path}
# With its metadata cache on, rgw (and radosgw-admin) notify every cache watcher on each metadata write;
# after a SIGKILL the dead rgw's watches linger for 30 s, stalling bucket creation that long.
# One rgw needs no cache coherence; the cost is a few ms per request.
rgw cache enabled = false

[mon]
mon data = {d}/mon/$name
admin socket = $run_dir/$name.asok
pid file = $run_dir/$name.pid
log file = {d}/log/$name.log

[osd]
osd data = {d}/osd/$name
osd objectstore = bluestore
# At start the OSD sets its crush location and device class through mon commands; with auth none it
# can send them before it knows the fsid, the mon answers 'wrong fsid' and the OSD exits (seen in 1 start
# of 10). osd.0 is placed once at mkfs instead, and no rule uses device classes.
osd crush update on start = false
osd class update on start = false
bluestore block size = {self.config.osd_size_bytes}
bluestore cache autotune = false
bluestore cache size = {64 * 2**20}
admin socket = $run_dir/$name.asok
pid file = $run_dir/$name.pid
log file = {d}/log/$name.log

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.config.s3_port}
rgw dns name = 127.0.0.1
rgw thread pool size = 32
rgw data = {d}/rgw
admin socket = $run_dir/$name.asok
pid file = $run_dir/$name.pid
log file = {d}/log/$name.log
"""
        self.conf_path.write_text(conf)

    def _key_fingerprint(self) -> str:
        # Lets a restart notice changed keys without storing the secret itself.
        pair = f"{self.config.access_key}\0{self.config.secret_key}".encode()
        return hashlib.sha256(pair).hexdigest()

    def _read_state(self) -> dict[str, object] | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None

    def _write_state(self, state: dict[str, object]) -> None:
        self.state_path.write_text(json.dumps(state, indent=2) + "\n")

    # -- daemons -------------------------------------------------------------------------------------------

    def _launch(self, daemon: _Daemon, deadline: float) -> None:
        """Start one daemon; it forks into the background and writes its pid file."""
        env = self._env()
        if daemon is _RGW:
            env["MALLOC_ARENA_MAX"] = "2"  # glibc's per-thread arenas otherwise inflate rgw's RSS
        argv = [daemon.binary, "-c", str(self.conf_path), *daemon.args]
        pid = self._processes[daemon].start(
            argv, env, daemonizes=True, timeout=max(deadline - time.monotonic(), 1)
        )
        log.info("ceph daemon started daemon=%s pid=%d", daemon.name, pid)

    def _all_daemons_alive(self) -> bool:
        return all(process.running() for process in self._processes.values())

    def _wait_ready(self, deadline: float) -> None:
        if wait_until(self.is_running, deadline - time.monotonic(), 0.2, alive=self._all_daemons_alive):
            return
        for process in self._processes.values():
            if not process.running():
                raise process.failure("it died")
        raise self._processes[_RGW].failure(f"radosgw did not answer on {self.endpoint} in time")

    # -- tools ---------------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CEPH_CONF"] = str(self.conf_path)  # never fall back to /etc/ceph/ceph.conf
        env.pop("CEPH_ARGS", None)
        return env

    def _run(self, *argv: str, timeout: float = 60, secret_args: Sequence[str] = ()) -> str:
        """Run a Ceph tool and return its stdout; errors name the command with secrets masked."""
        try:
            done = subprocess.run(
                argv,
                check=False,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise ObjectStoreError(
                f"{self._masked(argv, secret_args)} timed out after {timeout:.0f} s"
            ) from None
        if done.returncode != 0:
            raise ObjectStoreError(
                f"{self._masked(argv, secret_args)} failed with status {done.returncode}:\n"
                f"{done.stderr.strip()}\n{done.stdout.strip()}"
            )
        return done.stdout

    def _ceph(self, *args: str, deadline: float) -> str:
        remaining = max(deadline - time.monotonic(), 1)
        # --connect-timeout: without it the CLI waits forever for a mon that never came up.
        return self._run(
            "ceph",
            "-c",
            str(self.conf_path),
            f"--connect-timeout={remaining:.0f}",
            *args,
            timeout=remaining + 5,
        )

    def _radosgw_admin(self, *args: str, with_keys: bool = False) -> str:
        """Run radosgw-admin; ``with_keys`` appends the configured S3 key pair (masked in any error)."""
        # radosgw-admin takes keys only as arguments: they are briefly visible in /proc to local users.
        secret = f"--secret-key={self.config.secret_key}"
        keys = (f"--access-key={self.config.access_key}", secret) if with_keys else ()
        return self._run("radosgw-admin", "-c", str(self.conf_path), *args, *keys, secret_args=(secret,))

    @staticmethod
    def _masked(argv: Sequence[str], secret_args: Sequence[str]) -> str:
        return " ".join("--secret-key=***" if arg in secret_args else arg for arg in argv)


def _check_binaries() -> None:
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        raise ObjectStoreError(
            f"the local object store needs Ceph, but {', '.join(missing)} is not installed: "
            f"apt-get install -y --no-install-recommends {' '.join(APT_PACKAGES)}"
        )
