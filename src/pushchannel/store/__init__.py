"""Stores behind one interface, chosen by URL (docs/stores.md):

- ``memory://``: in-process, fastest, lost on exit;
- ``sqlite:///PATH``: embedded, durable, the default;
- ``redis://HOST:PORT/DB`` and ``redis+cluster://HOST:PORT``: Redis Streams, shared by several
  broker nodes (the ``redis`` extra; docs/scaling.md).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pushchannel.errors import InvalidArgument
from pushchannel.store.base import Store
from pushchannel.store.memory import MemoryStore
from pushchannel.store.sqlite import SQLiteStore

__all__ = ["DEFAULT_STORE_URL", "MemoryStore", "SQLiteStore", "Store", "open_store"]

DEFAULT_STORE_URL = "sqlite:///pushchannel-data/pushchannel.db"


def open_store(url: str, *, fsync: Literal["normal", "full"] = "normal") -> Store:
    """Build (not start) the store a URL names."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        return SQLiteStore(url, fsync=fsync)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        try:  # the optional extra: pip install 'pushchannel[redis]'
            from pushchannel.store.redis import RedisStore
        except ImportError as exc:
            raise InvalidArgument(
                f"the redis store needs the redis package ({exc}): pip install 'pushchannel[redis]'"
            ) from None
        return RedisStore(url)
    raise InvalidArgument(
        f"unknown store URL {url!r}: use sqlite:///PATH, memory://, redis://HOST:PORT/DB or redis+cluster://HOST:PORT"
    )
