"""TLS and mutual TLS: round trips through the SDK and the CLI, the wrong CA refused both
ways, the client certificate as identity, and certificates reloaded on SIGHUP without
dropping a stream (in a broker subprocess)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest

from pushchannel import AsyncClient
from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.server.tls import TlsError, client_credentials, load_server_files

from ..conftest import ROOT
from ..server.helpers import STEP, stub
from .conftest import (
    AuthSpec,
    Pki,
    StartBroker,
    StaticToken,
    bearer,
    secure_channel,
    spawn_broker,
    stop_broker,
    write_auth_file,
)

pytestmark = pytest.mark.timeout(60)

OPS = StaticToken("ops", "tok-ops-0123456789", ["*"], ["*"], True)
LATE = StaticToken("late", "tok-late-0123456789", ["late.*"], [], False)


async def _round_trip(target: str, tls: grpc.ChannelCredentials, token: str | None = None) -> None:
    async with AsyncClient(target, tls=tls, token=token) as client:
        result = await client.publish("hosts.berlin-1", b"over tls", id="tls-1")
        assert result.seq >= 1
        subscription = client.subscribe("hosts.berlin-1", start="earliest")
        async with asyncio.timeout(STEP), subscription:
            async for message in subscription:
                assert message.payload == b"over tls"
                await message.ack()
                break


async def _refused(target: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    ch = secure_channel(target, creds)
    try:
        await stub(ch).ListChannels(pb.ListChannelsRequest(), timeout=3)
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        await ch.close(None)
    raise AssertionError("the call went through")


async def test_tls_round_trip(pki: Pki, start_broker: StartBroker) -> None:
    server = await start_broker(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    assert server.tls is not None and not server.tls.mutual
    await _round_trip(server.target, client_credentials(pki.ca))


async def test_tls_wrong_ca_refused(pki: Pki, start_broker: StartBroker) -> None:
    server = await start_broker(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    assert await _refused(server.target, client_credentials(pki.other_ca)) == grpc.StatusCode.UNAVAILABLE
    # A plaintext client cannot talk to the TLS port either.
    plain = grpc.aio.insecure_channel(server.target, options=(("grpc.use_local_subchannel_pool", 1),))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(plain).ListChannels(pb.ListChannelsRequest(), timeout=3)
    await plain.close(None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await _round_trip(server.target, client_credentials(pki.ca))  # and the broker still serves


async def test_mtls_round_trip_and_refusals(pki: Pki, start_broker: StartBroker) -> None:
    server = await start_broker(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )
    assert server.tls is not None and server.tls.mutual
    await _round_trip(server.target, client_credentials(pki.ca, pki.client_cert, pki.client_key))
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert await _refused(server.target, client_credentials(pki.ca)) == unavailable  # no client cert
    foreign = client_credentials(pki.ca, pki.other_client_cert, pki.other_client_key)
    assert await _refused(server.target, foreign) == unavailable  # a cert from another CA
    wrong_server_ca = client_credentials(pki.other_ca, pki.client_cert, pki.client_key)
    assert await _refused(server.target, wrong_server_ca) == unavailable


async def test_client_certificate_as_identity(pki: Pki, tmp_path: Path, start_broker: StartBroker) -> None:
    """With mutual TLS and an auth file, a [[certificate]] entry names what a certificate's
    holder may do without a token; a certificate nobody listed needs a token."""
    auth = write_auth_file(
        tmp_path / "auth.toml",
        AuthSpec([OPS], certificates=[{"subject": "host-berlin-1", "subscribe": ["hosts.berlin-1"]}]),
    )
    server = await start_broker(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        auth_file=str(auth),
    )
    berlin = secure_channel(server.target, client_credentials(pki.ca, pki.client_cert, pki.client_key))
    stranger = secure_channel(server.target, client_credentials(pki.ca, pki.stranger_cert, pki.stranger_key))
    try:
        call = stub(berlin).Subscribe()
        await call.write(pb.SubscribeRequest(open=pb.Open(channel="hosts.berlin-1")))
        first = await asyncio.wait_for(call.read(), STEP)
        assert isinstance(first, pb.SubscribeResponse) and first.WhichOneof("kind") == "opened"
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(berlin).Publish(
                pb.PublishRequest(channel="hosts.berlin-1", messages=[pb.Message(payload=b"x")]), timeout=STEP
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "host-berlin-1" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(stranger).ListChannels(pb.ListChannelsRequest(), timeout=STEP)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A token, when given, is the identity (here the stranger's holder is an operator).
        await stub(stranger).ListChannels(pb.ListChannelsRequest(), metadata=bearer(OPS.token), timeout=STEP)
    finally:
        await berlin.close(None)
        await stranger.close(None)


async def test_cli_with_tls_flags(pki: Pki, tmp_path: Path, start_broker: StartBroker) -> None:
    auth = write_auth_file(tmp_path / "auth.toml", AuthSpec([OPS]))
    server = await start_broker(
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        auth_file=str(auth),
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PUSHCHANNEL_TOKEN=OPS.token)
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pushchannel.cli",
            *args,
            "--server",
            server.target,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await cli("publish", "hosts.cli", "hello", *tls)
    assert code == 0, err
    assert out.strip() == "seq 1"
    code, out, err = await cli("subscribe", "hosts.cli", "--count", "1", "--timeout", "10", *tls)
    assert code == 0, err
    assert out.strip() == "hello"
    code, out, err = await cli("publish", "hosts.cli", "x", "--tls-ca", str(pki.dir / "missing.pem"))
    assert code == 1 and err.startswith("error: ") and "missing.pem" in err and "Traceback" not in err


def test_bad_certificate_files_are_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="do not make a usable pair"):
        load_server_files(pki.server_cert, pki.client_key, None)  # somebody else's key
    with pytest.raises(TlsError, match="cannot read"):
        load_server_files(tmp_path / "missing.pem", pki.server_key, None)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsError, match="not PEM"):
        load_server_files(garbage, pki.server_key, None)
    with pytest.raises(TlsError, match="client CA"):
        load_server_files(pki.server_cert, pki.server_key, pki.server_key)
    with pytest.raises(TlsError, match="--tls-cert with --tls-key"):
        client_credentials(pki.ca, pki.client_cert, None)


def _install(src_cert: Path, src_key: Path, cert: Path, key: Path) -> None:
    """Replace the live files the way a deploy would: write beside, then rename over."""
    for src, dst in ((src_cert, cert), (src_key, key)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)


def _garble(path: Path) -> None:
    path.write_text("garbage\n")


def test_sighup_reloads_certificates_and_auth_without_dropping_streams(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    _install(pki.server_cert, pki.server_key, cert, key)
    auth = write_auth_file(tmp_path / "auth.toml", AuthSpec([OPS]))
    broker = spawn_broker(
        tmp_path / "broker.log",
        "--store",
        "memory://",
        "--heartbeat",
        "0.5",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--auth",
        str(auth),
    )
    try:
        asyncio.run(_sighup_scenario(broker.pid, broker.target, pki, cert, key, auth))
        log = broker.log_text()
        assert "TLS certificate reloaded" in log
        assert "TLS reload failed, keeping the current certificate" in log
        assert "auth rules reloaded" in log
    finally:
        stop_broker(broker)


async def _sighup_scenario(pid: int, target: str, pki: Pki, cert: Path, key: Path, auth: Path) -> None:
    old_creds, new_creds = client_credentials(pki.ca), client_credentials(pki.other_ca)
    ops = bearer(OPS.token)
    old = secure_channel(target, old_creds)
    call = stub(old).Subscribe(metadata=ops)
    try:
        await call.write(pb.SubscribeRequest(open=pb.Open(channel="hosts.reload", auto_ack=True)))
        first = await asyncio.wait_for(call.read(), STEP)
        assert isinstance(first, pb.SubscribeResponse) and first.WhichOneof("kind") == "opened"

        # New certificate from another CA, and a new token in the auth file; then SIGHUP.
        _install(pki.other_server_cert, pki.other_server_key, cert, key)
        write_auth_file(auth, AuthSpec([OPS, LATE]))
        os.kill(pid, signal.SIGHUP)

        # New connections get the new certificate (clients trusting the new CA get in) ...
        new = secure_channel(target, new_creds)
        deadline = time.monotonic() + 10
        while True:
            try:
                await stub(new).ListChannels(pb.ListChannelsRequest(), metadata=ops, timeout=2)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                await new.close(None)
                new = secure_channel(target, new_creds)
        # ... and clients trusting only the old CA no longer do.
        assert await _refused(target, old_creds) == grpc.StatusCode.UNAVAILABLE
        # The new token works, on the new connection.
        await stub(new).Publish(
            pb.PublishRequest(channel="late.x", messages=[pb.Message(payload=b"x")]),
            metadata=bearer(LATE.token),
            timeout=STEP,
        )
        # The stream opened before the reload still works: a message published over the new
        # connection arrives on it (heartbeats aside).
        await stub(new).Publish(
            pb.PublishRequest(channel="hosts.reload", messages=[pb.Message(payload=b"after reload")]),
            metadata=ops,
            timeout=STEP,
        )
        async with asyncio.timeout(STEP):
            while True:
                resp = await call.read()
                assert isinstance(resp, pb.SubscribeResponse), resp
                if resp.WhichOneof("kind") == "deliveries":
                    assert [d.payload for d in resp.deliveries.deliveries] == [b"after reload"]
                    break

        # A broken certificate on the next SIGHUP is refused; the current one stays in use.
        _garble(cert)
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(0.5)
        again = secure_channel(target, new_creds)
        await stub(again).ListChannels(pb.ListChannelsRequest(), metadata=ops, timeout=STEP)
        await again.close(None)
        await new.close(None)
    finally:
        call.cancel()
        await old.close(None)
