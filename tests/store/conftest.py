"""Fixtures for the store conformance suite: every test runs once per store in STORE_FACTORIES.

To add a store, add one line to STORE_FACTORIES (a function of the test's private directory that
returns the store, or an awaitable of it: not started yet) and, if it keeps its data across a
restart, leave it out of EPHEMERAL_STORES so the restart tests run for it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pushchannel.store.base import Store
from pushchannel.store.memory import MemoryStore
from pushchannel.store.sqlite import SQLiteStore

StoreFactory = Callable[[Path], Store | Awaitable[Store]]


def _redis_store(kind: str, path: Path) -> Store:
    """A store on the session's real redis-server (or 3-node cluster) under a key prefix of its
    own (skips, or fails in CI, without redis-server: tests/redis_server.py)."""
    from tests.redis_server import store_url

    url = store_url(kind, path)
    from pushchannel.store.redis import RedisStore

    return RedisStore(url)


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda _path: MemoryStore(),
    "sqlite": lambda p: SQLiteStore(f"sqlite:///{p}/db"),
    "redis": lambda p: _redis_store("redis", p),
    "redis-cluster": lambda p: _redis_store("redis-cluster", p),
}

#: Stores that lose everything on close: tests that need persistence skip for them.
EPHEMERAL_STORES = frozenset({"memory"})


async def build_store(name: str, path: Path) -> Store:
    """A new, not yet started store of kind ``name`` keeping its files (if any) under ``path``."""
    made = STORE_FACTORIES[name](path)
    if inspect.isawaitable(made):
        made = await made
    assert isinstance(made, Store)
    return made


def require_durable(store_name: str) -> None:
    """Skip the calling test, with the reason printed by ``-ra``, for a store without persistence."""
    if store_name in EPHEMERAL_STORES:
        pytest.skip(f"{store_name} store: nothing survives a restart")


class StoreOpener:
    """Opens started stores over one directory, so a test can close a store and reopen its data.

    ``await opener()`` builds and starts a fresh store; ``await opener.close(store)`` closes one
    early (a restart); whatever is still open is closed when the test ends.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.opened = False
        self._open: list[Store] = []

    async def __call__(self) -> Store:
        store = await build_store(self.name, self.path)
        await store.start()
        self._open.append(store)
        self.opened = True
        return store

    async def close(self, store: Store) -> None:
        if store in self._open:
            self._open.remove(store)
            await store.close()

    async def close_all(self) -> None:
        while self._open:
            await self._open.pop().close()


@pytest.fixture(params=list(STORE_FACTORIES))
def store_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store_factory(store_name: str, tmp_path: Path) -> AsyncIterator[StoreOpener]:
    opener = StoreOpener(store_name, tmp_path)
    try:
        yield opener
    finally:
        await opener.close_all()
        if store_name.startswith("redis") and opener.opened:
            from tests.redis_server import flush_prefix, prefix_for, store_url

            flush_prefix(store_url(store_name, tmp_path), prefix_for(tmp_path))


@pytest.fixture
async def store(store_factory: StoreOpener) -> Store:
    """A started store, closed after the test (by ``store_factory``)."""
    return await store_factory()
