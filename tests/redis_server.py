"""Real ``redis-server`` processes for the tests: on free loopback ports, in temporary directories,
always stopped (and, where ``setpriv`` exists, killed with the test process if that dies).

Without ``redis-server`` (or the ``redis`` package) the Redis tests skip with the reason, except
in CI (``CI=true``), where they fail: ``make test`` installs redis-server when it runs as root.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
#: util-linux' setpriv: the server gets SIGTERM when the test process dies (no Python code runs
#: between fork and exec, which is unsafe with gRPC's threads around).
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "SIGTERM", "--"] if shutil.which("setpriv") else []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_redis(*, cli: bool = False) -> str:
    """The path of redis-server, or skip the test (fail it in CI) when Redis cannot be run."""
    missing = []
    if REDIS_SERVER is None:
        missing.append("redis-server is not installed (apt-get install redis-server)")
    if cli and REDIS_CLI is None:
        missing.append("redis-cli is not installed (apt-get install redis-tools)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("the redis package is not installed (pip install 'pushchannel[redis]')")
    if missing:
        reason = "Redis tests need a real Redis: " + "; ".join(missing)
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    assert REDIS_SERVER is not None
    return REDIS_SERVER


def redis_package() -> ModuleType:
    """redis-py, or skip the module (fail it in CI) when it is not installed."""
    try:
        import redis
    except ImportError:
        reason = "Redis tests need the redis package: pip install 'pushchannel[redis]'"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command over a raw connection (RESP), its raw reply: no client library needed."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(out)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            data += chunk
            if not chunk or data.endswith(b"\r\n"):
                break
        return data


class _PortTaken(RuntimeError):
    """redis-server could not bind its port (or its cluster bus port)."""


class RedisServer:
    """One redis-server on 127.0.0.1. In memory only unless ``appendonly`` (AOF, fsync everysec)."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra: tuple[str, ...] = (),
        cluster_port: bool = False,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chosen_port = port is None  # ours to pick again if someone takes it first
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra = extra
        # A cluster node's bus port, picked here (not port + 10000: that one may be taken).
        self.cluster_port = free_port() if cluster_port else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start and wait for PING. A port picked free can be taken by another process before
        redis-server binds it: then it is picked again, up to 3 times in all."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except _PortTaken:
                if (not self._chosen_port and self.cluster_port is None) or attempt == 2:
                    raise
                if self._chosen_port:
                    self.port = free_port()
                if self.cluster_port is not None:
                    self.cluster_port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> RedisServer:
        binary = require_redis()
        bus = () if self.cluster_port is None else ("--cluster-port", str(self.cluster_port))
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            *self.extra,
            *bus,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [*_DIE_WITH_PARENT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                error = _PortTaken if "Address already in use" in log else RuntimeError
                raise error(f"redis-server exited with {self.proc.returncode}: {log}")
            if ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCluster:
    """A Redis Cluster of ``n`` primaries (no replicas) on loopback, made with redis-cli."""

    def __init__(self, directory: Path, n: int = 3) -> None:
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ),
                cluster_port=True,
            )
            for i in range(n)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> LocalCluster:
        require_redis(cli=True)
        assert REDIS_CLI is not None
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if all(b"cluster_state:ok" in command(n.port, "CLUSTER", "INFO") for n in self.nodes):
                    return self
                time.sleep(0.05)
            raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one server (and one cluster) for a whole test session: the store conformance suite ------------
_shared: dict[str, RedisServer | LocalCluster] = {}


def _stop_shared() -> None:
    for server in _shared.values():
        server.stop()
    for server in _shared.values():
        shutil.rmtree(
            server.nodes[0].dir.parent if isinstance(server, LocalCluster) else server.dir, ignore_errors=True
        )
    _shared.clear()


def shared_server() -> RedisServer:
    """A redis-server for the whole session (started on first use, stopped at exit)."""
    server = _shared.get("server")
    if server is None:
        require_redis()
        if not _shared:
            atexit.register(_stop_shared)
        server = _shared["server"] = RedisServer(Path(tempfile.mkdtemp(prefix="pushchannel-redis-"))).start()
    assert isinstance(server, RedisServer)
    return server


def shared_cluster() -> LocalCluster:
    """A 3-node Redis Cluster for the whole session (started on first use, stopped at exit)."""
    cluster = _shared.get("cluster")
    if cluster is None:
        require_redis(cli=True)
        if not _shared:
            atexit.register(_stop_shared)
        cluster = _shared["cluster"] = LocalCluster(
            Path(tempfile.mkdtemp(prefix="pushchannel-cluster-"))
        ).start()
    assert isinstance(cluster, LocalCluster)
    return cluster


def prefix_for(path: Path) -> str:
    """A key prefix of its own for each test directory (the same again for a reopened store)."""
    return "t" + hashlib.sha1(str(path).encode()).hexdigest()[:12] + ":"


def flush_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (what one test made), on a server or every cluster node."""
    import redis

    from pushchannel.store._redis_support import parse_url

    parsed = parse_url(url)
    client: redis.Redis | redis.RedisCluster
    if parsed.cluster:
        client = redis.RedisCluster(host=parsed.host, port=parsed.port)
    else:
        client = redis.Redis(host=parsed.host, port=parsed.port, db=parsed.db)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for key in keys:  # one by one: the keys of several channels live in several slots
            client.delete(key)
    finally:
        client.close()


def store_url(kind: str, path: Path) -> str:
    """The URL of a store for the test whose directory is ``path``: its own key prefix on the
    session's server (``kind`` "redis") or cluster ("redis-cluster")."""
    base = shared_cluster().url if kind == "redis-cluster" else shared_server().url
    return f"{base}?prefix={prefix_for(path)}"
