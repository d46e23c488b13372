"""The Redis store's plumbing: its URL, key names, error translation and the notifier that
wakes :meth:`RedisStore.wait` when any broker node appends (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.retry import Retry

from pushchannel.errors import (
    InternalError,
    InvalidArgument,
    PushChannelError,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger("pushchannel.store.redis")

DEFAULT_PREFIX = "pc:"
DEFAULT_SWEEP = 1.0
#: Seconds a command may take before the store gives up on Redis (UNAVAILABLE).
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 2.0

_SCHEMES = {
    "redis": ("redis", False),
    "rediss": ("rediss", False),
    "redis+cluster": ("redis", True),
    "rediss+cluster": ("rediss", True),
}


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A parsed ``redis://``, ``rediss://``, ``redis+cluster://`` or ``rediss+cluster://`` URL."""

    client_url: str  # what redis-py gets: our own query options removed, scheme redis/rediss
    cluster: bool
    prefix: str
    sweep_interval: float
    host: str
    port: int
    db: int

    def on_node(self, host: str, port: int) -> str:
        """The client URL pointed at another node (same credentials, TLS and options)."""
        parts = urlsplit(self.client_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + (f"[{host}]" if ":" in host else host) + f":{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

    @property
    def address(self) -> str:
        """Where Redis is, for messages: no password."""
        kind = "redis cluster" if self.cluster else "redis"
        db = "" if self.cluster else f"/{self.db}"
        return f"{kind} at {self.host}:{self.port}{db}"


def parse_url(url: str) -> RedisURL:
    """Split our options (``prefix``, ``sweep``) from what redis-py understands."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidArgument(
            f"not a redis store URL: {url!r} (use redis://HOST:PORT/DB or redis+cluster://HOST:PORT)"
        )
    client_scheme, cluster = _SCHEMES[scheme]
    try:
        host = parts.hostname or "localhost"
        port = parts.port or 6379
    except ValueError:
        raise InvalidArgument(f"bad port in the redis store URL {url!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise InvalidArgument(
            f"the database in a redis store URL is a number (redis://HOST:PORT/0), not {path!r}"
        )
    db = int(path) if path else 0
    if cluster and db != 0:
        raise InvalidArgument("a Redis Cluster has only database 0: use redis+cluster://HOST:PORT")
    prefix, sweep = DEFAULT_PREFIX, DEFAULT_SWEEP
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            prefix = value
        elif key == "sweep":
            try:
                sweep = float(value)
            except ValueError:
                sweep = math.nan
            if not (math.isfinite(sweep) and sweep > 0):
                raise InvalidArgument(f"sweep in the redis store URL must be positive seconds, not {value!r}")
        else:
            rest.append((key, value))
    if "{" in prefix or "}" in prefix:
        raise InvalidArgument(
            f"the key prefix {prefix!r} must not contain braces (they make cluster hash tags)"
        )
    client_url = urlunsplit((client_scheme, parts.netloc, "" if cluster else f"/{db}", urlencode(rest), ""))
    return RedisURL(client_url, cluster, prefix, sweep, host, port, db)


def display_url(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{quote(parts.username or '')}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Keys:
    """The names of one channel's keys; ``{channel}`` is the cluster hash tag."""

    __slots__ = ("base", "d", "dt", "m", "s")

    def __init__(self, prefix: str, channel: str) -> None:
        base = f"{prefix}{{{channel}}}"
        self.base = base
        self.m = base + ":m"
        self.s = base + ":s"
        self.d = base + ":d"
        self.dt = base + ":dt"

    def z(self, group: str) -> str:
        return f"{self.base}:z:{group}"

    def r(self, group: str) -> str:
        return f"{self.base}:r:{group}"


def client_options() -> dict[str, Any]:
    """Options for redis-py: fail fast while Redis is down, never send a command twice (a retried
    append could store a message twice: the broker and the SDK retry with the same ids instead)."""
    return {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }


def translate(exc: BaseException, address: str) -> PushChannelError:
    """A redis-py error as the pushchannel error it means, once, where it enters."""
    if isinstance(exc, PushChannelError):
        return exc
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, OutOfMemoryError) or detail.startswith("OOM"):
        return ResourceExhausted(
            f"the {address} is full ({detail}): consume, purge or delete channels, lower the retention "
            "limits, or raise Redis' maxmemory"
        )
    if isinstance(exc, ReadOnlyError) or detail.startswith(("READONLY", "MISCONF", "MASTERDOWN")):
        return Unavailable(
            f"the {address} refuses writes ({detail}): check Redis' persistence and replication"
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
        return Unavailable(
            f"the {address} is unavailable ({detail}): check that Redis is running and reachable"
        )
    if isinstance(exc, RedisClusterException) or detail.startswith(
        ("CLUSTERDOWN", "TRYAGAIN", "LOADING", "BUSY", "MOVED", "ASK")
    ):
        return Unavailable(f"the {address} is unavailable ({detail}): check the cluster's state")
    if isinstance(exc, ResponseError):
        return InternalError(f"the {address} refused a command: {detail}")
    if isinstance(exc, RedisError):
        return Unavailable(f"the {address} failed: {detail}")
    return InternalError(f"the {address} failed: {detail}")


STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


async def close_client(client: Any) -> None:
    """Close a redis-py client of any version (``aclose`` since 5.0.1)."""
    closer: Any = getattr(client, "aclose", None) or client.close
    with contextlib.suppress(Exception):
        await closer()


class Notifier:
    """Wakes waiters when an append on any broker node published ``"<last_seq> <channel>"`` on
    the store's notify channel. One Pub/Sub connection per store, whatever the number of
    channels; after a reconnect every waiter is woken to look again (notes sent while the
    connection was down are lost)."""

    def __init__(self, connect: Callable[[int], Awaitable[aioredis.Redis]], name: str, address: str) -> None:
        self._connect = connect
        self.name = name
        self.address = address
        self._waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        #: Times the subscription was (re)made: tests and logs.
        self.connects = 0

    async def start(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = loop.create_task(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake_all()

    def register(self, channel: str) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        return fut

    def unregister(self, channel: str, fut: asyncio.Future[int]) -> None:
        waiters = self._waiters.get(channel)
        if waiters is None:
            return
        if fut in waiters:
            waiters.remove(fut)
        if not waiters:
            del self._waiters[channel]

    def _wake(self, channel: str, seq: int) -> None:
        for fut in self._waiters.pop(channel, ()):
            if not fut.done():
                fut.set_result(seq)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(-1)  # look again

    def _on_message(self, data: bytes) -> None:
        seq_text, _, channel = data.partition(b" ")
        try:
            seq = int(seq_text)
        except ValueError:
            return
        self._wake(channel.decode("utf-8", "replace"), seq)

    async def _run(self) -> None:
        delay = 0.1
        attempt = 0
        while not self._closed:
            client: aioredis.Redis | None = None
            try:
                client = await self._connect(attempt)
                pubsub: Any = client.pubsub()
                try:
                    await pubsub.subscribe(self.name)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                        if message is None:
                            continue
                        kind = message.get("type")
                        if kind in ("subscribe", b"subscribe"):
                            self.connects += 1
                            delay, attempt = 0.1, 0
                            if self.connects > 1:
                                log.info("store notifications resumed from the %s", self.address)
                            if self._ready is not None and not self._ready.done():
                                self._ready.set_result(None)
                            self._wake_all()
                        elif kind in ("message", b"message"):
                            self._on_message(message["data"])
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_exception(translate(exc, self.address))
                    return
                log.warning(
                    "store notifications from the %s lost (%s): retrying in %.1f s", self.address, exc, delay
                )
                self._wake_all()
            finally:
                if client is not None:
                    await close_client(client)
            attempt += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def unique(seqs: Iterable[int]) -> list[str]:
    """Distinct seqs as the zero-padded members the scripts use for pending entries."""
    return [f"{s:016d}" for s in sorted(set(seqs)) if s > 0]
