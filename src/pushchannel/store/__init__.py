"""Stores behind one interface, chosen by URL: ``memory://`` (more to come, see docs/stores.md)."""

from __future__ import annotations

from urllib.parse import urlparse

from pushchannel.errors import InvalidArgument
from pushchannel.store.base import Store
from pushchannel.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "open_store"]


def open_store(url: str) -> Store:
    """Build (not start) the store a URL names."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemoryStore()
    if scheme in ("sqlite", "redis"):
        raise InvalidArgument(f"the {scheme} store is not available yet: use --store memory://")
    raise InvalidArgument(f"unknown store URL {url!r}: use memory://")
