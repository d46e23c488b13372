"""A broker process stops gracefully on SIGTERM and SIGINT: subscribers get UNAVAILABLE (so
clients reconnect elsewhere), and the process exits 0 within its grace period."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from tests.conftest import start_broker_process, stop_process
from tests.server.helpers import STEP, Subscriber, publish, stub


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_broker_and_tells_subscribers_to_reconnect(sig: signal.Signals) -> None:
    proc, target = start_broker_process("--store", "memory://")
    try:
        async with grpc.aio.insecure_channel(target) as channel, Subscriber(channel) as sub:
            await sub.open("hosts.a")
            await publish(stub(channel), "hosts.a", "before")
            (d,) = await sub.take(1)
            assert d.payload == b"before"
            t0 = time.monotonic()
            proc.send_signal(sig)
            err = await sub.wait_ended()
            assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "shutting down" in (err.details() or "")
        code = await asyncio.to_thread(proc.wait, STEP * 2)
        assert code == 0
        assert time.monotonic() - t0 < 10.0  # well within the default 10 s grace
    finally:
        stop_process(proc)
