"""The authorization matrix: every kind of token, every channel and each of {publish, subscribe, admin},
each on the v1 service and the seed's MessageSync, with the expected status in every cell.

Tokens: static ones from the auth file, JWTs signed HS256 and RS256, and the broken ones
(expired, not yet valid, wrong or missing audience, bad signature, unknown key, alg none,
garbage, none at all)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.server.app import RunningServer

from ..server.helpers import STEP, seed_stub, stub
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

OK, DENIED, UNAUTH = "OK", "PERMISSION_DENIED", "UNAUTHENTICATED"
Y, N, U = OK, DENIED, UNAUTH  # the matrix's letters

ORDERS, BERLIN, PARIS, BERLIN_DL = (
    "orders.eu",
    "hosts.berlin-1",
    "hosts.paris-2",
    "hosts.berlin-1.dead-letter",
)
CHANNELS = (ORDERS, BERLIN, PARIS, BERLIN_DL)

STATIC = [
    StaticToken("publisher", "tok-publisher-0123456789", publish=["orders.*"]),
    StaticToken("host-berlin", "tok-host-berlin-0123456789", subscribe=["hosts.berlin-1"]),
    StaticToken("all-hosts", "tok-all-hosts-0123456789", subscribe=["hosts.*"]),
    StaticToken("dead-letters", "tok-dead-letters-0123456789", subscribe=["hosts.*.dead-letter"]),
    StaticToken("admin", "tok-admin-0123456789", admin=True),
    StaticToken("ops", "tok-ops-0123456789", ["*", "*.dead-letter"], ["*", "*.dead-letter"], True),
]
TOKENS = {t.name: t.token for t in STATIC}


def _alg_none(claims: dict[str, object]) -> str:
    def b64(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def jwt_tokens(keys: Keys) -> dict[str, str]:
    rights: dict[str, Any] = {"publish": ["orders.*"], "subscribe": ["hosts.berlin-1"]}
    now = time.time()
    good = {"exp": int(now + 3600), "aud": "pushchannel", **rights}
    return {
        "jwt-hs256": sign(keys.hs256_secret, "HS256", **rights),
        "jwt-rs256": sign(keys.rs256_private, "RS256", **rights),
        "jwt-rs256-admin": sign(keys.rs256_private, "RS256", admin=True),
        "jwt-hs256-dead-letters": sign(
            keys.hs256_secret, subscribe=["hosts.berlin-1", "hosts.berlin-1.dead-letter"]
        ),
        "jwt-expired": sign(keys.hs256_secret, **rights, ttl=-5),
        "jwt-not-yet": sign(keys.hs256_secret, **rights, nbf=now + 600),
        "jwt-wrong-aud": sign(keys.hs256_secret, **rights, aud="another-service"),
        "jwt-no-aud": sign(keys.hs256_secret, **rights, aud=None),
        "jwt-bad-signature": sign(keys.hs256_secret, **rights)[:-4] + "AAAA",
        "jwt-unknown-hs-key": sign(keys.other_hs256_secret, **rights),
        "jwt-unknown-rs-key": sign(keys.other_rs256_private, "RS256", **rights),
        "jwt-alg-none": _alg_none(good),
        "jwt-bad-claims": sign(keys.hs256_secret, extra={"publish": "x", "subscribe": {"a": 1}}),
        "garbage": "not-a-token-at-all",
        "garbage-jwt-shape": "aaa.bbb.ccc",
        "none": "",
    }


# Columns: publish on each channel, subscribe on each channel, admin.
#                           publish to              subscribe to            admin
#                           orders berlin paris dl  orders berlin paris dl
# fmt: off
MATRIX: dict[str, tuple[str, ...]] = {
    "publisher":              (Y, N, N, N,             N, N, N, N,             N),
    "host-berlin":            (N, N, N, N,             N, Y, N, N,             N),
    "all-hosts":              (N, N, N, N,             N, Y, Y, N,             N),
    "dead-letters":           (N, N, N, N,             N, N, N, Y,             N),
    "admin":                  (N, N, N, N,             N, N, N, N,             Y),
    "ops":                    (Y, Y, Y, Y,             Y, Y, Y, Y,             Y),
    "jwt-hs256":              (Y, N, N, N,             N, Y, N, N,             N),
    "jwt-rs256":              (Y, N, N, N,             N, Y, N, N,             N),
    "jwt-rs256-admin":        (N, N, N, N,             N, N, N, N,             Y),
    "jwt-hs256-dead-letters": (N, N, N, N,             N, Y, N, Y,             N),
    **{
        broken: (U,) * 9
        for broken in (
            "jwt-expired", "jwt-not-yet", "jwt-wrong-aud", "jwt-no-aud", "jwt-bad-signature",
            "jwt-unknown-hs-key", "jwt-unknown-rs-key", "jwt-alg-none", "jwt-bad-claims",
            "garbage", "garbage-jwt-shape", "none",
        )
    },
}
# fmt: on


@pytest.fixture
async def secured(tmp_path: Path, keys: Keys, start_broker: StartBroker) -> RunningServer:
    auth = write_auth_file(
        tmp_path / "auth.toml", AuthSpec(STATIC, hs256=[keys.hs256_secret], rs256=[keys.rs256_public])
    )
    return await start_broker(auth_file=str(auth))


def _code(exc: grpc.aio.AioRpcError) -> str:
    return str(exc.code().name)


async def _publish(ch: grpc.aio.Channel, channel: str, md: tuple[tuple[str, str], ...]) -> str:
    try:
        await stub(ch).Publish(
            pb.PublishRequest(channel=channel, messages=[pb.Message(payload=b"m")]), metadata=md, timeout=STEP
        )
    except grpc.aio.AioRpcError as e:
        return _code(e)
    return OK


async def _publish_stream(ch: grpc.aio.Channel, channel: str, md: tuple[tuple[str, str], ...]) -> str:
    """PublishStream answers a refused request in its response (error_code 7) and goes on;
    a stream without a valid token ends with UNAUTHENTICATED."""
    call = stub(ch).PublishStream(metadata=md, timeout=STEP)
    try:
        await call.write(pb.PublishRequest(channel=channel, messages=[pb.Message(payload=b"s")], ref=7))
        resp = await call.read()
        await call.done_writing()
    except grpc.aio.AioRpcError as e:
        return _code(e)
    assert isinstance(resp, pb.PublishResponse), resp
    assert resp.ref == 7
    if resp.error_code:
        assert resp.error_code == grpc.StatusCode.PERMISSION_DENIED.value[0], resp
        assert channel in resp.error_message
        return DENIED
    assert len(resp.results) == 1
    return OK


async def _submit(ch: grpc.aio.Channel, channel: str, md: tuple[tuple[str, str], ...]) -> str:
    try:
        reply = await seed_stub(ch).SubmitMessage(
            push_pb2.SubmitRequest(channel=channel, message="seed"), metadata=md, timeout=STEP
        )
    except grpc.aio.AioRpcError as e:
        return _code(e)
    assert reply.reply == "received"
    return OK


async def _subscribe(ch: grpc.aio.Channel, channel: str, md: tuple[tuple[str, str], ...]) -> str:
    call = stub(ch).Subscribe(metadata=md)
    try:
        await call.write(
            pb.SubscribeRequest(open=pb.Open(channel=channel, group=f"matrix-{time.monotonic_ns()}"))
        )
        first = await asyncio.wait_for(call.read(), STEP)
    except grpc.aio.AioRpcError as e:
        return _code(e)
    finally:
        call.cancel()
    assert isinstance(first, pb.SubscribeResponse) and first.WhichOneof("kind") == "opened", first
    return OK


async def _seed_stream(
    ch: grpc.aio.Channel, channel: str, md: tuple[tuple[str, str], ...], ops: grpc.aio.Channel
) -> str:
    """A seed stream sends nothing until a message comes: publish one first (as ops), then the
    stream either delivers a message or fails."""
    await stub(ops).Publish(
        pb.PublishRequest(channel=channel, messages=[pb.Message(payload=b"for-seed")]),
        metadata=bearer(TOKENS["ops"]),
        timeout=STEP,
    )
    call = seed_stub(ch).PushMessageStream(push_pb2.ConnRequest(channel=channel), metadata=md)
    try:
        reply = await asyncio.wait_for(call.read(), STEP)
    except grpc.aio.AioRpcError as e:
        return _code(e)
    finally:
        call.cancel()
    assert isinstance(reply, push_pb2.MessageReply), reply
    return OK


async def _admin(ch: grpc.aio.Channel, md: tuple[tuple[str, str], ...]) -> list[str]:
    b = stub(ch)
    codes = []
    for call in (
        b.ListChannels(pb.ListChannelsRequest(), metadata=md, timeout=STEP),
        b.GetChannel(pb.GetChannelRequest(channel=ORDERS), metadata=md, timeout=STEP),
        b.PurgeChannel(pb.PurgeChannelRequest(channel=PARIS), metadata=md, timeout=STEP),
        b.DeleteGroup(pb.DeleteGroupRequest(channel=PARIS, group="nobody"), metadata=md, timeout=STEP),
    ):
        try:
            await call
            codes.append(OK)
        except grpc.aio.AioRpcError as e:
            codes.append(_code(e))
    return codes


async def test_authorization_matrix(secured: RunningServer, keys: Keys) -> None:
    tokens = {**TOKENS, **jwt_tokens(keys)}
    assert set(tokens) == set(MATRIX), "every token has its row"
    ch, ops = insecure_channel(secured.target), insecure_channel(secured.target)
    # Every channel exists with a message (GetChannel and the seed stream need them).
    for c in CHANNELS:
        assert await _publish(ops, c, bearer(TOKENS["ops"])) == OK
    got: dict[str, tuple[str, ...]] = {}
    mismatches: list[str] = []
    try:
        for name, token in tokens.items():
            md = bearer(token)
            row: list[str] = []
            for c in CHANNELS:  # publish: Publish, PublishStream, SubmitMessage must agree
                answers = {
                    "Publish": await _publish(ch, c, md),
                    "PublishStream": await _publish_stream(ch, c, md),
                    "SubmitMessage": await _submit(ch, c, md),
                }
                if len(set(answers.values())) != 1:
                    mismatches.append(f"{name} publish {c}: {answers}")
                row.append(answers["Publish"])
            for c in CHANNELS:  # subscribe: Subscribe/Open and PushMessageStream must agree
                answers = {
                    "Subscribe": await _subscribe(ch, c, md),
                    "PushMessageStream": await _seed_stream(ch, c, md, ops),
                }
                if len(set(answers.values())) != 1:
                    mismatches.append(f"{name} subscribe {c}: {answers}")
                row.append(answers["Subscribe"])
            admin = await _admin(ch, md)
            if len(set(admin)) != 1:
                mismatches.append(f"{name} admin (List, Get, Purge, DeleteGroup): {admin}")
            row.append(admin[0])
            got[name] = tuple(row)
    finally:
        await ch.close(None)
        await ops.close(None)
    wrong = {name: (MATRIX[name], row) for name, row in got.items() if row != MATRIX[name]}
    assert not wrong, "\n".join(f"{n}: expected {e}, got {g}" for n, (e, g) in wrong.items())
    assert not mismatches, "\n".join(mismatches)
    assert secured.auth.failures > 0


async def test_refused_publish_stores_nothing(secured: RunningServer) -> None:
    """PERMISSION_DENIED and UNAUTHENTICATED publishes leave no trace in the channel."""
    ch = insecure_channel(secured.target)
    try:
        assert await _publish(ch, "orders.quiet", bearer(TOKENS["ops"])) == OK
        for token in (TOKENS["host-berlin"], TOKENS["admin"], "garbage", ""):
            assert await _publish(ch, "orders.quiet", bearer(token)) != OK
            assert await _publish_stream(ch, "orders.quiet", bearer(token)) != OK
            assert await _submit(ch, "orders.quiet", bearer(token)) != OK
        info = await stub(ch).GetChannel(
            pb.GetChannelRequest(channel="orders.quiet"), metadata=bearer(TOKENS["admin"]), timeout=STEP
        )
        assert info.depth == 1 and info.last_seq == 1
    finally:
        await ch.close(None)


async def test_publish_stream_checks_every_request(secured: RunningServer) -> None:
    """One stream, allowed and refused channels interleaved: each answer in its place, the
    stream goes on."""
    ch = insecure_channel(secured.target)
    call = stub(ch).PublishStream(metadata=bearer(TOKENS["publisher"]), timeout=STEP)
    try:
        channels = ["orders.a", "hosts.x", "orders.b", "orders", "orders.c.dead-letter", "orders.d"]
        for ref, c in enumerate(channels, 1):
            await call.write(pb.PublishRequest(channel=c, messages=[pb.Message(payload=b"x")], ref=ref))
        await call.done_writing()
        answers = [r async for r in call]
        assert [r.ref for r in answers] == list(range(1, len(channels) + 1))
        assert [r.error_code for r in answers] == [0, 7, 0, 7, 7, 0]
        assert all(r.error_message == "" for r in answers if r.error_code == 0)
    finally:
        await ch.close(None)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer", "expected 'authorization: Bearer <token>'"),
        ("Basic dXNlcjpwYXNz", "expected 'authorization: Bearer <token>'"),
        ("bearer tok-ops-0123456789", None),  # the scheme is case-insensitive
        ("Bearer  tok-ops-0123456789 ", None),
    ],
)
async def test_authorization_header_forms(secured: RunningServer, header: str, expected: str | None) -> None:
    ch = insecure_channel(secured.target)
    try:
        call = stub(ch).ListChannels(
            pb.ListChannelsRequest(), metadata=(("authorization", header),), timeout=STEP
        )
        if expected is None:
            await call
        else:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert expected in (info.value.details() or "")
    finally:
        await ch.close(None)


async def test_failures_logged_with_name_never_token(
    secured: RunningServer, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    expired = sign(keys.hs256_secret, sub="host-lisbon", publish=["orders.*"], ttl=-5)
    ch = insecure_channel(secured.target)
    try:
        with caplog.at_level("WARNING", logger="pushchannel.auth"):
            assert await _publish(ch, "hosts.paris-2", bearer(TOKENS["publisher"])) == DENIED
            assert await _publish(ch, "orders.eu", bearer(expired)) == UNAUTH
            assert await _publish(ch, "orders.eu", bearer("secret-garbage-value")) == UNAUTH
    finally:
        await ch.close(None)
    events = [vars(r) for r in caplog.records if r.name == "pushchannel.auth"]
    assert all(e.get("event") == "auth_failed" for e in events), events

    def has(**fields: str) -> bool:
        return any(all(str(e.get(k, "")).find(v) >= 0 for k, v in fields.items()) for e in events)

    assert has(
        code="PERMISSION_DENIED",
        token_name="publisher",
        channel="hosts.paris-2",
        method="/pushchannel.v1.Broker/Publish",
        reason="no publish right",
    ), events
    assert has(code="UNAUTHENTICATED", token_name="jwt:host-lisbon", reason="expired"), events
    assert has(code="UNAUTHENTICATED", reason="unknown token", peer="127.0.0.1"), events
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    for secret in (TOKENS["publisher"], expired, "secret-garbage-value"):
        assert secret not in text
