"""Fault tests: a broker with a short heartbeat, and a fault-injecting proxy in front of it."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pushchannel.config import BrokerConfig
from tests.faults.proxy import FaultProxy

HEARTBEAT = 0.3  # so that three missed heartbeats take under a second


@pytest.fixture
def broker_config() -> BrokerConfig:
    return BrokerConfig(heartbeat_interval=HEARTBEAT, retention_interval=0.2)


@pytest.fixture
async def proxy(broker_target: str) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(broker_target).start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog: pytest.LogCaptureFixture):
    """Fail on what asyncio only logs: destroyed pending tasks, unretrieved exceptions."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    gc.collect()
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not errors


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 20 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)
