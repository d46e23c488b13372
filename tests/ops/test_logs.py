"""Structured logs: a broker process with ``--log-format json`` writes only JSON lines, one per
subscription opened and closed, with peer, channel, group and mode, and never a payload,
an attribute, a message id or a token."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.core.broker import Broker
from pushchannel.core.subscription import IdleClock, SubscribeParams, Subscription
from pushchannel.server.logs import ConnectionLog, configure_logging, log_auth_failure, redact_url
from pushchannel.store.memory import MemoryStore
from tests.conftest import free_port, wait_for_port
from tests.ops._util import ROOT
from tests.server.helpers import STEP, Subscriber, msg, publish, stub

pytestmark = pytest.mark.timeout(60)

ARGS = ("--store", "memory://", "--log-format", "json", "--heartbeat", "0.5")
SECRETS = ("TOPSECRET-PAYLOAD-42", "ATTR-VALUE-SECRET", "MSG-ID-SECRET", "BEARER-TOKEN-SECRET")


def _start_json_broker(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "pushchannel.cli", "serve", "--listen", f"127.0.0.1:{port}", *ARGS],
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def test_json_lines_from_a_broker_process(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "stderr.log"
    proc = _start_json_broker(port, log_path)
    try:
        wait_for_port(port, proc)
        target = f"127.0.0.1:{port}"
        token = (("authorization", f"Bearer {SECRETS[3]}"),)
        async with grpc.aio.insecure_channel(target) as channel:
            broker = stub(channel)
            secret_msg = msg(SECRETS[0], id=SECRETS[2], attributes={"k": SECRETS[1]})
            await broker.Publish(
                pb.PublishRequest(channel="logs.a", messages=[secret_msg]), metadata=token, timeout=STEP
            )
            async with Subscriber(channel, ack_on_receipt=True) as queue, Subscriber(channel) as wide:
                await queue.open("logs.a", group="workers", position=pb.Open.EARLIEST)
                await wide.open("logs.a", mode=pb.Open.BROADCAST)
                (d,) = await queue.take(1)
                assert d.payload == SECRETS[0].encode()
                await publish(broker, "logs.a", "second")
                await wide.take(1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, STEP * 2) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        for secret in SECRETS:
            assert secret not in line, line
    for r in records:
        assert {"time", "level", "logger", "msg"} <= set(r), r
    events = [r.get("event") for r in records]
    assert events[0] == "listening" and events[-1] == "stopped" and "shutdown" in events, events
    opened = [r for r in records if r.get("event") == "subscription_opened"]
    closed = [r for r in records if r.get("event") == "subscription_closed"]
    assert len(opened) == len(closed) == 2
    assert {(r["group"], r["mode"]) for r in opened} == {
        ("workers", "queue"),
        (opened[1]["group"], "broadcast"),
    }
    for r in opened + closed:
        assert r["channel"] == "logs.a" and "127.0.0.1" in r["peer"] and r["consumer"]
    assert all(isinstance(r["duration_s"], float) and r["reason"] for r in closed)


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, list[str]]]:
    """configure_logging into a buffer; the root logger is put back afterwards."""
    root = logging.getLogger()
    level = root.level
    buf = io.StringIO()
    handler = configure_logging("json", stream=buf)
    try:
        yield buf, []
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _records(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_an_error_is_one_json_line_with_its_traceback(captured: tuple[io.StringIO, list[str]]) -> None:
    buf, _ = captured
    broker = Broker(MemoryStore())
    try:
        raise OSError("disk full")
    except OSError as exc:
        broker.log_error("retention", "logs.c", exc)
    (record,) = _records(buf)
    assert record["level"] == "error" and record["event"] == "error"
    assert (record["where"], record["channel"], record["error"]) == ("retention", "logs.c", "disk full")
    assert "OSError: disk full" in str(record["traceback"])


def test_auth_failures_name_the_token_never_show_it(captured: tuple[io.StringIO, list[str]]) -> None:
    buf, _ = captured
    log_auth_failure(
        "ipv4:10.0.0.9:4242",
        "/pushchannel.v1.Broker/Publish",
        "channel outside the token's publish patterns",
        code="PERMISSION_DENIED",
        token_name="saas-backend",
        channel="billing.x",
    )
    (record,) = _records(buf)
    assert record["event"] == "auth_failed" and record["level"] == "warning"
    assert (record["code"], record["token_name"], record["channel"]) == (
        "PERMISSION_DENIED",
        "saas-backend",
        "billing.x",
    )


def test_text_lines_carry_the_same_fields() -> None:
    root = logging.getLogger()
    level = root.level
    buf = io.StringIO()
    handler = configure_logging("text", stream=buf)
    try:
        params = SubscribeParams("hosts.a b")
        sub = Subscription("n-1", params, "default", "ipv4:127.0.0.1:5", 0.0, IdleClock())
        ConnectionLog().on_subscribe(sub)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    (line,) = buf.getvalue().splitlines()
    assert " INFO pushchannel.connections subscription opened event=subscription_opened " in line
    assert 'channel="hosts.a b"' in line and "peer=ipv4:127.0.0.1:5" in line and "mode=queue" in line


def test_configure_logging_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    level = root.level
    first = configure_logging("text", stream=io.StringIO())
    second = configure_logging("json", stream=io.StringIO())
    try:
        assert first not in root.handlers and second in root.handlers
    finally:
        root.removeHandler(second)
        root.setLevel(level)


def test_store_urls_lose_their_password() -> None:
    assert redact_url("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("redis://app:hunter2@cache/0") == "redis://app:***@cache/0"
    assert redact_url("sqlite:///data/pc.db") == "sqlite:///data/pc.db"
