"""Fuzzing a running broker: random bytes, mutated valid frames and random well-typed requests
at every RPC of both services, with and without valid tokens. No call may end INTERNAL or
UNKNOWN (bad input always has a proper answer), nothing may be logged as an error, and
afterwards the broker still serves and a message stored before the fuzzing comes out intact."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.server.app import RunningServer

from ..server.helpers import STEP, Subscriber, stub
from .conftest import AuthSpec, StartBroker, StaticToken, bearer, insecure_channel, write_auth_file

pytestmark = pytest.mark.timeout(60)

OPS = StaticToken("ops", "tok-ops-0123456789", ["*", "*.dead-letter"], ["*", "*.dead-letter"], True)
LIMITED = StaticToken("limited", "tok-limited-0123456789", ["fuzz.*"], ["fuzz.*"], False)
CANARY = "canary-" + secrets.token_hex(24)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

# method path -> (request type, request streaming, response streaming)
METHODS: dict[str, tuple[Any, bool, bool]] = {
    "/pushchannel.v1.Broker/Publish": (pb.PublishRequest, False, False),
    "/pushchannel.v1.Broker/PublishStream": (pb.PublishRequest, True, True),
    "/pushchannel.v1.Broker/Subscribe": (pb.SubscribeRequest, True, True),
    "/pushchannel.v1.Broker/ListChannels": (pb.ListChannelsRequest, False, False),
    "/pushchannel.v1.Broker/GetChannel": (pb.GetChannelRequest, False, False),
    "/pushchannel.v1.Broker/PurgeChannel": (pb.PurgeChannelRequest, False, False),
    "/pushchannel.v1.Broker/DeleteChannel": (pb.DeleteChannelRequest, False, False),
    "/pushchannel.v1.Broker/DeleteGroup": (pb.DeleteGroupRequest, False, False),
    "/MessageSync/SubmitMessage": (push_pb2.SubmitRequest, False, False),
    "/MessageSync/PushMessageStream": (push_pb2.ConnRequest, False, True),
}

# -- strategies ---------------------------------------------------------------------------------------
names = st.one_of(
    st.sampled_from(["fuzz.a", "fuzz.b", "fuzz.c"]),
    st.sampled_from(["fuzz.a", "fuzz.b", "fuzz.a.dead-letter", "hosts.x", "", ".x", "a" * 256, "fuzz.*"]),
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + "._-:/", min_size=1, max_size=30).map(
        lambda s: "fuzz." + s
    ),
)
uint32 = st.integers(0, 2**32 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.integers(0, 2**64 - 1)


def sane_or_wild(sane: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly values the broker accepts (so calls get deep), sometimes anything."""
    return st.one_of(sane, sane, sane, wild)


messages = st.builds(
    pb.Message,
    id=sane_or_wild(st.just(""), st.one_of(st.text(max_size=20), st.text(min_size=250, max_size=300))),
    payload=st.binary(max_size=300),
    attributes=sane_or_wild(
        st.just({}), st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)
    ),
    ttl_ms=sane_or_wild(st.sampled_from([0, 60_000]), uint64),
)
publish_requests = st.builds(
    pb.PublishRequest, channel=names, messages=st.lists(messages, max_size=3), ref=uint64
)
opens = st.builds(
    pb.Open,
    channel=names,
    group=st.one_of(st.just(""), names),
    mode=sane_or_wild(st.sampled_from([0, 1, 2]), st.integers(3, 2**31 - 1)),
    max_in_flight=sane_or_wild(st.integers(0, 50), uint32),
    ack_deadline_ms=sane_or_wild(st.sampled_from([0, 1, 1000]), uint32),
    auto_ack=st.booleans(),
).flatmap(
    lambda o: st.one_of(
        st.just(o),
        st.builds(lambda v: _with(o, position=v), st.sampled_from([0, 1, 2, 7])),
        st.builds(lambda v: _with(o, start_seq=v), sane_or_wild(st.integers(0, 5), uint64)),
        st.builds(lambda v: _with(o, start_time_ms=v), int64),
    )
)
sane_opens = st.builds(
    pb.Open,
    channel=st.sampled_from(["fuzz.a", "fuzz.b"]),
    group=st.sampled_from(["", "g1"]),
    mode=st.sampled_from([0, 1, 2]),
    max_in_flight=st.integers(0, 50),
    auto_ack=st.booleans(),
)
tags = st.lists(uint64, max_size=5)
acks = st.one_of(
    st.builds(lambda t: pb.SubscribeRequest(ack=pb.Ack(delivery_tags=t)), tags),
    st.builds(
        lambda t, d, r: pb.SubscribeRequest(nack=pb.Nack(delivery_tags=t, delay_ms=d, reason=r)),
        tags,
        uint32,
        st.text(max_size=30),
    ),
    st.builds(
        lambda t, d: pb.SubscribeRequest(modify_deadline=pb.ModifyDeadline(delivery_tags=t, deadline_ms=d)),
        tags,
        uint32,
    ),
)
subscribe_requests = st.one_of(st.builds(lambda o: pb.SubscribeRequest(open=o), opens), acks)
WELL_TYPED: dict[str, st.SearchStrategy[Any]] = {
    "/pushchannel.v1.Broker/Publish": publish_requests,
    "/pushchannel.v1.Broker/PublishStream": publish_requests,
    "/pushchannel.v1.Broker/Subscribe": subscribe_requests,
    "/pushchannel.v1.Broker/ListChannels": st.builds(pb.ListChannelsRequest, prefix=st.text(max_size=20)),
    "/pushchannel.v1.Broker/GetChannel": st.builds(pb.GetChannelRequest, channel=names),
    "/pushchannel.v1.Broker/PurgeChannel": st.builds(pb.PurgeChannelRequest, channel=names),
    "/pushchannel.v1.Broker/DeleteChannel": st.builds(pb.DeleteChannelRequest, channel=names),
    "/pushchannel.v1.Broker/DeleteGroup": st.builds(pb.DeleteGroupRequest, channel=names, group=names),
    "/MessageSync/SubmitMessage": st.builds(
        push_pb2.SubmitRequest, channel=names, message=st.text(max_size=50)
    ),
    "/MessageSync/PushMessageStream": st.builds(push_pb2.ConnRequest, channel=names),
}


def _with(o: pb.Open, **field: Any) -> pb.Open:
    copy = pb.Open()
    copy.CopyFrom(o)
    for k, v in field.items():
        setattr(copy, k, v)
    return copy


@st.composite
def mutated(draw: st.DrawFn, method: str) -> bytes:
    """A valid frame for ``method`` with bytes flipped, cut, inserted or repeated."""
    data = bytearray(draw(WELL_TYPED[method]).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "repeat":
            data += data[pos:]
    return bytes(data)


def frames(method: str) -> st.SearchStrategy[bytes]:
    """What goes on the wire for one request of ``method``."""
    well_typed = WELL_TYPED[method].map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=512), mutated(method), well_typed, well_typed, well_typed)


tokens = st.one_of(  # mostly valid, so that the fuzzing gets past authentication
    st.sampled_from([OPS.token, OPS.token, OPS.token, LIMITED.token, LIMITED.token, None]),
    st.text(alphabet=string.printable.strip() + " ", max_size=80),
    st.just("aaa.bbb.ccc"),
)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, list[bytes], str | None]:
    method = draw(st.sampled_from(sorted(METHODS)))
    _, streaming, _ = METHODS[method]
    count = draw(st.integers(1, 4)) if streaming else 1
    requests = [draw(frames(method)) for _ in range(count)]
    if method.endswith("/Subscribe") and draw(st.integers(0, 3)):  # mostly: Open first, then acks
        requests[0] = pb.SubscribeRequest(open=draw(st.one_of(opens, sane_opens))).SerializeToString()
        requests[1:] = [
            draw(st.one_of(acks.map(lambda m: m.SerializeToString()), frames(method))) for _ in requests[1:]
        ]
    return method, requests, draw(tokens)


# -- the test ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "sqlite"])
async def fuzzed(request: pytest.FixtureRequest, tmp_path: Path, start_broker: StartBroker) -> RunningServer:
    auth = write_auth_file(tmp_path / "auth.toml", AuthSpec([OPS, LIMITED]))
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/fuzz.db"
    return await start_broker(store_url=url, auth_file=str(auth))


# A write that races the server's end of the call fails on the client with this INTERNAL,
# made up by the client library (the server's own status is then lost); not a broker error.
CLIENT_SIDE_INTERNAL = "Internal error from Core"


async def _call(
    ch: grpc.aio.Channel, method: str, requests: list[bytes], token: str | None
) -> grpc.StatusCode:
    _, req_stream, resp_stream = METHODS[method]
    md = bearer(token) if token and token.strip() else ()
    try:
        if not req_stream and not resp_stream:
            await ch.unary_unary(method, None, None)(requests[0], metadata=md, timeout=2)
            return grpc.StatusCode.OK
        call: Any
        if not req_stream:
            call = ch.unary_stream(method, None, None)(requests[0], metadata=md, timeout=2)
        else:
            call = ch.stream_stream(method, None, None)(None, metadata=md, timeout=2)
            with contextlib.suppress(asyncio.InvalidStateError):  # the server already ended it
                for r in requests:
                    await call.write(r)
        try:
            async with asyncio.timeout(0.05):
                async for _ in call:
                    pass
        except TimeoutError:  # still open after a moment: accepted (the timeout cancelled it)
            call.cancel()
            return grpc.StatusCode.OK
        return await call.code()  # type: ignore[no-any-return]
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.INTERNAL and e.details() == CLIENT_SIDE_INTERNAL:
            return grpc.StatusCode.CANCELLED
        return e.code()


async def test_fuzz_every_rpc(fuzzed: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    ch, control = insecure_channel(fuzzed.target), insecure_channel(fuzzed.target)
    ops = bearer(OPS.token)
    canary = pb.Message(id="canary-1", payload=bytes(range(256)) * 3, attributes={"k": "v", "ü": "\u2603"})
    await stub(control).Publish(
        pb.PublishRequest(channel=CANARY, messages=[canary]), metadata=ops, timeout=STEP
    )
    seen: dict[str, set[str]] = {}

    loop = asyncio.get_running_loop()

    async def one(call: tuple[str, list[bytes], str | None]) -> None:
        method, requests, token = call
        code = await _call(ch, method, requests, token)
        seen.setdefault(method, set()).add(code.name)
        assert code not in FORBIDDEN, (method, requests, code)

    # Hypothesis drives synchronous functions: it runs in a worker thread and hands each call to
    # the event loop, which goes on serving the broker meanwhile.
    @settings(
        max_examples=500,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(call=calls())
    def fuzz(call: tuple[str, list[bytes], str | None]) -> None:
        asyncio.run_coroutine_threadsafe(one(call), loop).result(timeout=10)

    try:
        with caplog.at_level("ERROR"):
            await asyncio.to_thread(fuzz)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert set(seen) == set(METHODS), "every RPC was fuzzed"
        # Still serving, and the canary is intact.
        async with Subscriber(control, ack_on_receipt=True) as sub:
            sub._stub = stub(control)
            await _open_with_token(sub, CANARY, OPS.token)
            [got] = await sub.take(1)
        assert (got.id, got.payload, dict(got.attributes), got.seq) == (
            "canary-1",
            canary.payload,
            dict(canary.attributes),
            1,
        )
        result = await stub(control).Publish(
            pb.PublishRequest(channel="after.fuzz", messages=[pb.Message(payload=b"ok")]),
            metadata=ops,
            timeout=STEP,
        )
        assert result.results[0].seq == 1
    finally:
        await ch.close(None)
        await control.close(None)
    print({m.rsplit("/", 1)[1]: sorted(c) for m, c in seen.items()})


async def _open_with_token(sub: Subscriber, channel: str, token: str) -> None:
    """Subscriber.open with a token (the helper's own open sends none)."""
    sub._requests.put_nowait(pb.SubscribeRequest(open=pb.Open(channel=channel)))
    sub._call = sub._stub.Subscribe(sub._gen(), metadata=bearer(token))
    first = await asyncio.wait_for(sub._call.read(), STEP)
    assert isinstance(first, pb.SubscribeResponse) and first.WhichOneof("kind") == "opened", first
    sub.opened = first.opened
    sub._reader = asyncio.get_running_loop().create_task(sub._read())
