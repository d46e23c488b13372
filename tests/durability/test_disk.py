"""A full store and an unusable file, at broker level: a full store refuses publishes with
RESOURCE_EXHAUSTED and keeps (and delivers) what it holds; a corrupt file stops ``serve`` with one
line and is left as it was."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.config import BrokerConfig, ServerConfig
from pushchannel.core.broker import Broker
from pushchannel.core.model import NewMessage
from pushchannel.errors import ResourceExhausted
from pushchannel.server import app
from pushchannel.store.sqlite import SQLiteStore
from tests.conftest import free_port
from tests.durability._broker import channel_info, group_info, open_channel, run_serve, running_broker
from tests.server.helpers import Subscriber, eventually, publish, rpc_error
from tests.server.helpers import stub as pb_stub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

CAP = 200  # pages of 4 KiB: an 800 KiB store
CH = "jobs.full"


def payload(i: int) -> bytes:
    return f"{i:08d}".encode() * 128  # 1 KiB, different for each message


async def test_the_core_answers_resource_exhausted_when_the_store_is_full(tmp_path: Path):
    broker = Broker(SQLiteStore(f"sqlite:///{tmp_path}/pc.db", max_page_count=CAP))
    await broker.start()
    try:
        stored = 0
        for _ in range(1000):
            batch = [NewMessage(payload(stored + j), id=f"m{stored + j}") for j in range(10)]
            try:
                await broker.publish(CH, batch)
            except ResourceExhausted as exc:
                assert "store is full" in str(exc), exc
                break
            stored += len(batch)
        else:
            raise AssertionError("the store never filled up")
        assert stored > 100
        assert await broker.store.last_seq(CH) == stored
        kept = await broker.store.read_range(CH, 0, 10**6)
        assert [(m.seq, m.id, m.payload) for m in kept] == [
            (i + 1, f"m{i}", payload(i)) for i in range(stored)
        ]
    finally:
        await broker.close()


async def test_a_full_store_refuses_publishes_keeps_and_delivers_what_it_has(tmp_path, monkeypatch):
    def capped_store(url: str, *, fsync: str = "normal") -> SQLiteStore:
        return SQLiteStore(url, fsync=fsync, max_page_count=CAP)  # type: ignore[arg-type]

    monkeypatch.setattr(app, "open_store", capped_store)
    running = await app.start_server(
        ServerConfig(
            listen="127.0.0.1:0",
            store_url=f"sqlite:///{tmp_path}/pc.db",
            broker=BrokerConfig(retention_interval=0.2),
            grace=0.5,
        )
    )
    try:
        async with open_channel(running.target) as channel:
            stub = pb_stub(channel)
            stored = 0
            for _ in range(1000):
                batch = [pb.Message(id=f"m{stored + j}", payload=payload(stored + j)) for j in range(10)]
                try:
                    await publish(stub, CH, *batch)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert "store is full" in (exc.details() or ""), exc.details()
                    break
                stored += len(batch)
            else:
                raise AssertionError("the store never filled up")
            assert stored > 100
            # Still full: refused again, nothing half-written.
            err = await rpc_error(publish(stub, CH, *batch))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            info = await channel_info(stub, CH)
            assert (info.depth, info.first_seq, info.last_seq) == (stored, 1, stored)

            # Everything stored before is delivered, intact and in order; acking makes room.
            async with Subscriber(channel, ack_on_receipt=True) as sub:
                await sub.open(CH, max_in_flight=1000)
                got = await sub.take(stored, timeout=10)
                assert [(d.seq, d.id, d.payload) for d in got] == [
                    (i + 1, f"m{i}", payload(i)) for i in range(stored)
                ]

                async def all_acked() -> bool:  # acks write too: they fit under the cap
                    return group_info(await channel_info(stub, CH), "default").pending == 0

                await eventually(all_acked)
            deadline = time.monotonic() + 5
            while True:  # retention frees the acked messages; then the refused batch fits
                try:
                    results = await publish(stub, CH, *batch)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert time.monotonic() < deadline, (
                        f"no room came back after everything was acked: {exc.details()}; "
                        f"{await channel_info(stub, CH)}"
                    )
                    await asyncio.sleep(0.1)
            assert [(r.seq, r.duplicate) for r in results] == [(stored + 1 + j, False) for j in range(10)]
    finally:
        await running.stop(0.5)


def expect_refused(tmp_path: Path, db: Path, *fragments: str) -> str:
    before = db.read_bytes()
    done = run_serve("--listen", f"127.0.0.1:{free_port()}", "--store", f"sqlite:///{db}", cwd=tmp_path)
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback, no log
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert db.read_bytes() == before, "the refused file was changed"
    assert not Path(f"{db}-wal").exists()
    return lines[0]


def test_serve_refuses_a_file_of_random_bytes_and_leaves_it_alone(tmp_path: Path):
    db = tmp_path / "pc.db"
    db.write_bytes(random.Random(11).randbytes(64 * 1024))
    expect_refused(tmp_path, db, str(db), "is not a valid pushchannel database", "restore a backup")


async def test_serve_refuses_a_damaged_database_and_leaves_it_alone(tmp_path: Path):
    db = tmp_path / "pc.db"
    async with running_broker(tmp_path, db=db) as broker, open_channel(broker.target) as channel:
        for _ in range(50):
            await publish(pb_stub(channel), CH, os.urandom(2000))
        assert await broker.terminate() == 0
    assert db.stat().st_size > 20 * 4096
    with db.open("r+b") as f:  # scribble over b-tree pages, the header left intact
        f.seek(4096 * 3)
        f.write(random.Random(3).randbytes(4096 * 4))
    expect_refused(tmp_path, db, str(db), "is not a valid pushchannel database (corrupt?)")
