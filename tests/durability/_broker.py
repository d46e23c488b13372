"""A broker subprocess on one SQLite file and one port that a test can kill -9, stop with SIGTERM
and start again on the same port and file. Its output goes to a log file, never to a pipe that
could fill up and stall it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel._proto.pushchannel.v1 import broker_pb2_grpc
from tests.conftest import ROOT, free_port, wait_for_port

# Reconnect quickly once the broker is back (gRPC's default backoff starts at 1 s and grows).
CLIENT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pushchannel.cli", "serve", *args]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def run_serve(*args: str, cwd: Path, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """``pushchannel serve ARGS`` that is expected to exit by itself (a refusal)."""
    return subprocess.run(
        serve_command(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout, check=False
    )


class BrokerProcess:
    """``pushchannel serve`` on ``127.0.0.1:port`` with ``--store sqlite:///db``."""

    def __init__(self, tmp: Path, *args: str, db: Path | None = None, port: int | None = None) -> None:
        self.tmp = tmp
        self.db = db or tmp / "broker.db"
        self.port = port or free_port()
        self.args = args
        self.log = tmp / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _start(self) -> None:
        assert not self.running, "the broker is already running"
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                serve_command(
                    "--listen", self.target, "--store", f"sqlite:///{self.db}", "--grace", "2", *self.args
                ),
                cwd=self.tmp,
                env=env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        try:
            wait_for_port(self.port, self.proc)
        except Exception as exc:
            self.stop()
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    async def start(self) -> None:
        """Start (again, on the same port and file) and wait until it listens."""
        await asyncio.to_thread(self._start)

    async def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        assert self.proc is not None and self.running, "the broker is not running"
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait, 10)
        self.kills += 1

    async def terminate(self) -> int:
        """SIGTERM and wait for the graceful exit; its exit code."""
        assert self.proc is not None and self.running, "the broker is not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, 15)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"the broker did not exit within 15 s of SIGTERM\n{self.log_tail()}"
            ) from None

    async def restart(self, how: str) -> None:
        """Stop the broker ``how`` (``sigterm`` or ``kill9``) and start it again."""
        if how == "kill9":
            await self.kill()
        else:
            assert await self.terminate() == 0, self.log_tail()
        await self.start()

    def stop(self) -> None:
        """For ``finally``: whatever state the broker is in, it is not running afterwards."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return "broker log:\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no broker log)"


@asynccontextmanager
async def running_broker(tmp: Path, *args: str, db: Path | None = None) -> AsyncIterator[BrokerProcess]:
    broker = BrokerProcess(tmp, *args, db=db)
    await broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@asynccontextmanager
async def open_channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
    try:
        yield channel
    finally:
        await channel.close(None)


@asynccontextmanager
async def connect(target: str) -> AsyncIterator[broker_pb2_grpc.BrokerStub]:
    async with open_channel(target) as channel:
        yield broker_pb2_grpc.BrokerStub(channel)  # type: ignore[no-untyped-call]


async def channel_info(stub: broker_pb2_grpc.BrokerStub, channel: str) -> pb.ChannelInfo:
    info: pb.ChannelInfo = await stub.GetChannel(
        pb.GetChannelRequest(channel=channel), timeout=5, wait_for_ready=True
    )
    return info


def group_info(info: pb.ChannelInfo, group: str) -> pb.GroupInfo:
    for g in info.groups:
        if g.name == group:
            return g
    raise AssertionError(f"no group {group!r} in {[g.name for g in info.groups]}")
