"""A stream lives no longer than its token: it is closed with UNAUTHENTICATED when the token
expires, and when a reload of the auth file revokes the token or narrows its rights. What the
closed stream held is delivered again to the next consumer: nothing is lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.server.app import RunningServer

from ..server.helpers import STEP, Subscriber, seed_stub, stub
from .conftest import (
    AuthSpec,
    Keys,
    StartBroker,
    StaticToken,
    bearer,
    insecure_channel,
    sign,
    write_auth_file,
)

pytestmark = pytest.mark.timeout(60)

OPS = StaticToken("ops", "tok-ops-0123456789", ["*"], ["*"], True)
HOST = StaticToken("host-berlin", "tok-host-0123456789", [], ["hosts.berlin-1"])
OTHER = StaticToken("host-paris", "tok-paris-0123456789", [], ["hosts.paris-2"])
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


class AuthedSubscriber(Subscriber):
    """The helpers' Subscriber, with a token."""

    def __init__(self, channel: grpc.aio.Channel, token: str, **kw: bool) -> None:
        super().__init__(channel, **kw)
        self._md = bearer(token)

    async def open(self, channel: str, **fields: object) -> pb.Opened:
        self._requests.put_nowait(pb.SubscribeRequest(open=pb.Open(channel=channel, **fields)))  # type: ignore[arg-type]
        self._call = self._stub.Subscribe(self._gen(), metadata=self._md)
        first = await asyncio.wait_for(self._call.read(), STEP)
        assert isinstance(first, pb.SubscribeResponse) and first.WhichOneof("kind") == "opened", first
        self.opened = first.opened
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return first.opened


@pytest.fixture
def auth_path(tmp_path: Path, keys: Keys) -> Path:
    return write_auth_file(tmp_path / "auth.toml", AuthSpec([OPS, HOST, OTHER], hs256=[keys.hs256_secret]))


@pytest.fixture
async def secured(auth_path: Path, start_broker: StartBroker) -> RunningServer:
    return await start_broker(auth_file=str(auth_path))


async def publish_as(ops: Any, channel: str, payload: bytes, token: str = OPS.token) -> None:
    await ops.Publish(
        pb.PublishRequest(channel=channel, messages=[pb.Message(payload=payload)]),
        metadata=bearer(token),
        timeout=STEP,
    )


async def test_subscribe_closed_at_token_expiry(secured: RunningServer, keys: Keys) -> None:
    token = sign(keys.hs256_secret, sub="short-lived", subscribe=["hosts.*"], ttl=3)
    expires = int(time.time() + 3)
    ch = insecure_channel(secured.target)
    try:
        ops = stub(ch)
        sub = AuthedSubscriber(ch, token)
        await sub.open("hosts.berlin-1")
        await publish_as(ops, "hosts.berlin-1", b"before expiry")
        [d] = await sub.take(1)
        assert d.payload == b"before expiry"  # held, never acked
        err = await sub.wait_ended(timeout=6)
        assert err is not None and err.code() == UNAUTHENTICATED, err
        assert "expired" in (err.details() or "")
        assert time.time() >= expires - 0.05
        # The unacked message goes to the next consumer (with a fresh token).
        fresh = AuthedSubscriber(ch, HOST.token)
        await fresh.open("hosts.berlin-1")
        [again] = await fresh.take(1)
        assert again.payload == b"before expiry" and again.attempt == 2
        await fresh.close()
    finally:
        await ch.close(None)


async def test_seed_stream_closed_at_token_expiry(secured: RunningServer, keys: Keys) -> None:
    token = sign(keys.hs256_secret, sub="seed-host", subscribe=["hosts.*"], ttl=3)
    ch = insecure_channel(secured.target)
    try:
        call = seed_stub(ch).PushMessageStream(
            push_pb2.ConnRequest(channel="hosts.seed"), metadata=bearer(token)
        )
        await publish_as(stub(ch), "hosts.seed", b"one")
        first = await asyncio.wait_for(call.read(), STEP)
        assert isinstance(first, push_pb2.MessageReply) and first.message == "one"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 6)
        assert info.value.code() == UNAUTHENTICATED
    finally:
        await ch.close(None)


async def test_publish_stream_closed_at_token_expiry(secured: RunningServer, keys: Keys) -> None:
    token = sign(keys.hs256_secret, sub="producer", publish=["orders.*"], ttl=3)
    ch = insecure_channel(secured.target)
    try:
        call = stub(ch).PublishStream(metadata=bearer(token))
        await call.write(pb.PublishRequest(channel="orders.x", messages=[pb.Message(payload=b"1")], ref=1))
        resp = await asyncio.wait_for(call.read(), STEP)
        assert isinstance(resp, pb.PublishResponse) and resp.error_code == 0 and resp.results[0].seq == 1
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # idle: closed at expiry, not at the next request
            await asyncio.wait_for(call.read(), 6)
        assert info.value.code() == UNAUTHENTICATED
        assert time.monotonic() - started < 4.5
    finally:
        await ch.close(None)


async def test_reload_revokes_and_narrows(secured: RunningServer, auth_path: Path, keys: Keys) -> None:
    """SIGHUP's auth half (called directly here; tests/security/test_tls.py sends a real
    SIGHUP): a removed token's stream ends UNAUTHENTICATED, a narrowed one's PERMISSION_DENIED,
    an untouched one keeps receiving; new calls follow the new file at once."""
    ch = insecure_channel(secured.target)
    try:
        ops = stub(ch)
        host = AuthedSubscriber(ch, HOST.token, ack_on_receipt=True)
        paris = AuthedSubscriber(ch, OTHER.token, ack_on_receipt=True)
        jwt_host = AuthedSubscriber(ch, sign(keys.hs256_secret, subscribe=["hosts.*"]), ack_on_receipt=True)
        await host.open("hosts.berlin-1")
        await paris.open("hosts.paris-2")
        await jwt_host.open("hosts.lyon-3")
        # New file: host-berlin is gone, host-paris may now only read hosts.paris-3, JWTs unchanged.
        narrowed = StaticToken(OTHER.name, OTHER.token, [], ["hosts.paris-3"])
        write_auth_file(auth_path, AuthSpec([OPS, narrowed], hs256=[keys.hs256_secret]))
        secured.reload()
        err = await host.wait_ended()
        assert err is not None and err.code() == UNAUTHENTICATED and "revoked" in (err.details() or "")
        err = await paris.wait_ended()
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        await publish_as(ops, "hosts.lyon-3", b"still here")
        [d] = await jwt_host.take(1)
        assert d.payload == b"still here"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(ch).ListChannels(pb.ListChannelsRequest(), metadata=bearer(HOST.token), timeout=STEP)
        assert info.value.code() == UNAUTHENTICATED
        await jwt_host.close()
    finally:
        await ch.close(None)


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


async def test_bad_reload_keeps_the_rules(
    secured: RunningServer, auth_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _append(auth_path, "\n[[token]]\nname = 'broken'\nsha256 = 'not-hex'\n")
    with caplog.at_level("ERROR", logger="pushchannel.auth"):
        secured.reload()
    assert any("auth reload failed" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    ch = insecure_channel(secured.target)
    try:
        await publish_as(stub(ch), "orders.y", b"x")  # the old rules still hold
    finally:
        await ch.close(None)


async def test_key_rotation_and_leaked_key(secured: RunningServer, auth_path: Path, keys: Keys) -> None:
    """Rotation: with both keys listed, tokens of either work; removing a (leaked) key closes
    the streams of the tokens it signed, a PublishStream at its next request."""
    old_token = sign(keys.hs256_secret, sub="old-key", subscribe=["hosts.*"], publish=["orders.*"])
    new_token = sign(keys.other_hs256_secret, sub="new-key", subscribe=["hosts.*"])
    ch = insecure_channel(secured.target)
    try:
        write_auth_file(auth_path, AuthSpec([OPS], hs256=[keys.hs256_secret, keys.other_hs256_secret]))
        secured.reload()
        old_sub = AuthedSubscriber(ch, old_token, ack_on_receipt=True)
        new_sub = AuthedSubscriber(ch, new_token, ack_on_receipt=True)
        await old_sub.open("hosts.a")
        await new_sub.open("hosts.b")
        producer = stub(ch).PublishStream(metadata=bearer(old_token))
        await producer.write(
            pb.PublishRequest(channel="orders.z", messages=[pb.Message(payload=b"1")], ref=1)
        )
        first = await asyncio.wait_for(producer.read(), STEP)
        assert isinstance(first, pb.PublishResponse) and first.error_code == 0
        # The old key leaked: drop it.
        write_auth_file(auth_path, AuthSpec([OPS], hs256=[keys.other_hs256_secret]))
        secured.reload()
        err = await old_sub.wait_ended()
        assert err is not None and err.code() == UNAUTHENTICATED
        await producer.write(
            pb.PublishRequest(channel="orders.z", messages=[pb.Message(payload=b"2")], ref=2)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(producer.read(), STEP)
        assert info.value.code() == UNAUTHENTICATED
        await publish_as(stub(ch), "hosts.b", b"new key still works")
        [d] = await new_sub.take(1)
        assert d.payload == b"new key still works"
        await new_sub.close()
    finally:
        await ch.close(None)
