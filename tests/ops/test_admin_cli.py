"""``pushchannel channels | channel | purge | delete | health`` against a broker process with
real channels, groups and consumers, in text and ``--json``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import pytest

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.cli.admin import human_age, human_bytes
from tests.conftest import start_broker_process, stop_process
from tests.ops._util import cli
from tests.server.helpers import Subscriber, publish, stub

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    proc, target = start_broker_process("--store", "memory://", "--heartbeat", "0.5")
    try:
        yield target
    finally:
        stop_process(proc)


async def admin(*args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(cli, *args)
    return done.returncode, done.stdout, done.stderr


async def test_channels_and_channel_show_depth_groups_and_consumers(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        broker = stub(channel)
        await publish(broker, "adm.hosts", *(f"m{i}" for i in range(6)))  # 2 bytes each
        await publish(broker, "adm.other", "x")
        async with Subscriber(channel) as worker, Subscriber(channel) as watcher:
            opened = await worker.open(
                "adm.hosts", group="workers", position=pb.Open.EARLIEST, max_in_flight=2
            )
            assert len(await worker.take(2)) == 2
            await watcher.open("adm.hosts", mode=pb.Open.BROADCAST)

            code, out, err = await admin("channels", "--prefix", "adm.", "--server", target)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].split() == [
                "CHANNEL",
                "DEPTH",
                "BYTES",
                "OLDEST",
                "GROUP",
                "LAG",
                "PENDING",
                "CONSUMERS",
            ]
            hosts = lines.index(next(line for line in lines if line.startswith("adm.hosts")))
            assert lines[hosts].split()[:4] == ["adm.hosts", "6", "12", "B"]
            assert lines[hosts].split()[-4:] == ["default", "6", "0", "0"]
            assert lines[hosts + 1].split() == ["workers", "4", "2", "1"]
            assert lines[hosts + 2].split() == ["(broadcast)", "-", "-", "1"]
            assert any(line.startswith("adm.other") for line in lines)

            code, out, err = await admin("channels", "--prefix", "adm.", "--json", "--server", target)
            assert code == 0, err
            listed = {c["name"]: c for c in json.loads(out)}
            assert set(listed) == {"adm.hosts", "adm.other"}
            hosts_info = listed["adm.hosts"]
            assert (hosts_info["depth"], hosts_info["bytes"], hosts_info["last_seq"]) == (6, 12, 6)
            groups = {g["name"]: (g["lag"], g["pending"], g["consumers"]) for g in hosts_info["groups"]}
            assert groups == {"default": (6, 0, 0), "workers": (4, 2, 1)}
            modes = sorted(c["mode"] for c in hosts_info["consumers"])
            assert modes == ["broadcast", "queue"]

            code, out, err = await admin("channel", "adm.hosts", "--server", target)
            assert code == 0, err
            assert "depth     6 messages, 12 B" in out
            assert opened.consumer in out and "127.0.0.1" in out

            code, out, err = await admin("channel", "adm.hosts", "--json", "--server", target)
            assert code == 0, err
            one = json.loads(out)
            assert one["name"] == "adm.hosts" and one["depth"] == 6
            worker_info = next(c for c in one["consumers"] if c["id"] == opened.consumer)
            assert (worker_info["group"], worker_info["in_flight"], worker_info["mode"]) == (
                "workers",
                2,
                "queue",
            )
            assert worker_info["since"].endswith("Z")


async def test_purge_and_delete(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await publish(stub(channel), "adm.purge", "a", "b", "c")
        await publish(stub(channel), "adm.gone", "a")
        async with Subscriber(channel) as sub:  # a durable group to delete
            await sub.open("adm.gone", group="audit")

    code, out, err = await admin("purge", "adm.purge", "--server", target)
    assert (code, out.strip()) == (0, "purged 3 messages from adm.purge"), err
    code, out, _ = await admin("purge", "adm.purge", "--json", "--server", target)
    assert json.loads(out) == {"channel": "adm.purge", "purged": 0}
    code, out, _ = await admin("channel", "adm.purge", "--json", "--server", target)
    assert json.loads(out)["depth"] == 0

    code, out, err = await admin("delete", "adm.gone", "--group", "audit", "--json", "--server", target)
    assert code == 0, err
    assert json.loads(out) == {"channel": "adm.gone", "deleted": True, "group": "audit"}
    code, out, err = await admin("delete", "adm.gone", "--server", target)
    assert (code, out.strip()) == (0, "deleted channel 'adm.gone'"), err

    code, out, err = await admin("delete", "adm.gone", "--server", target)
    assert code == 1 and out == ""
    assert err.splitlines() == ["error: channel 'adm.gone' does not exist (see 'pushchannel channels')"]
    code, _, err = await admin("channel", "adm.gone", "--server", target)
    assert code == 1 and len(err.splitlines()) == 1 and "does not exist" in err


async def test_health_command(target: str) -> None:
    code, out, err = await admin("health", "--server", target)
    assert (code, out.strip()) == (0, "SERVING"), err
    code, out, _ = await admin("health", "--service", "pushchannel.v1.Broker", "--json", "--server", target)
    assert json.loads(out) == {"service": "pushchannel.v1.Broker", "status": "SERVING"}


async def test_an_unreachable_broker_is_one_line() -> None:
    code, out, err = await admin("channels", "--server", "127.0.0.1:1", "--timeout", "2")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def test_human_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 << 30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    assert [human_age(s) for s in (1.25, 42, 125, 7300, 200000)] == ["1.2s", "42s", "2m05s", "2h01m", "2d07h"]
