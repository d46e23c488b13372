"""Shared fixtures: real brokers on free loopback ports, never mocks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from pushchannel.config import BrokerConfig
from pushchannel.server.app import RunningServer, ServerConfig, start_server

ROOT = Path(__file__).resolve().parent.parent
TEST_BROKER = BrokerConfig(heartbeat_interval=0.5, retention_interval=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def broker_config() -> BrokerConfig:
    """Override in a test module to change the broker's settings."""
    return TEST_BROKER


@pytest.fixture(params=["memory", "sqlite"])
def broker_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every broker-level test runs on each in-process store."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture
async def broker_server(broker_config: BrokerConfig, broker_store_url: str) -> AsyncIterator[RunningServer]:
    """An in-process broker on a free loopback port, on the test's event loop."""
    running = await start_server(
        ServerConfig(listen="127.0.0.1:0", store_url=broker_store_url, broker=broker_config, grace=0.5)
    )
    try:
        yield running
    finally:
        await running.stop(0.5)


@pytest.fixture
def broker_target(broker_server: RunningServer) -> str:
    return broker_server.target


@pytest.fixture
async def grpc_channel(broker_target: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(broker_target)
    try:
        yield channel
    finally:
        await channel.close(None)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {port} within {timeout} s")


def start_broker_process(*extra: str, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pushchannel.cli", "serve", "--listen", f"127.0.0.1:{port}", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc, f"127.0.0.1:{port}"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
def broker_process() -> Iterator[str]:
    """A `pushchannel serve` subprocess on the memory store; yields its target."""
    proc, target = start_broker_process("--store", "memory://", "--heartbeat", "0.5")
    try:
        yield target
    finally:
        stop_process(proc)


__all__ = ["TEST_BROKER", "free_port", "replace", "start_broker_process", "stop_process"]
