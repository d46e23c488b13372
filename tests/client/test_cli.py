"""The `pushchannel` command, run as a subprocess against a `pushchannel serve` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0


def cli(*args: str, server: str | None = None, stdin: str | None = None, timeout: float = WAIT):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("PUSHCHANNEL_TOKEN", None)
    if server is not None:
        env["PUSHCHANNEL_SERVER"] = server
    return subprocess.run(
        [sys.executable, "-m", "pushchannel.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_publish_then_subscribe(broker_process: str) -> None:
    published = cli("publish", "hosts.a", "hello", "wörld", server=broker_process)
    assert published.returncode == 0, published.stderr
    assert published.stdout.splitlines() == ["seq 1", "seq 2"]

    got = cli("subscribe", "hosts.a", "--count", "2", "--timeout", "10", server=broker_process)
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == ["hello", "wörld"]

    # They were acked: the next subscriber sees only what comes after.
    cli("publish", "hosts.a", "third", "--server", broker_process)
    got = cli("subscribe", "hosts.a", "--count", "1", "--json", "--server", broker_process, "--timeout", "10")
    assert got.returncode == 0, got.stderr
    (line,) = got.stdout.splitlines()
    record = json.loads(line)
    assert record["payload"] == "third" and record["seq"] == 3 and record["attempt"] == 1


def test_publish_from_stdin_attributes_and_json(broker_process: str) -> None:
    published = cli(
        "publish",
        "lines",
        "--attr",
        "kind=test",
        "--attr",
        "x=1=2",
        stdin="a\nb\n\nc\n",
        server=broker_process,
    )
    assert published.returncode == 0, published.stderr
    assert published.stdout.splitlines() == ["seq 1", "seq 2", "seq 3"]

    got = cli("subscribe", "lines", "--count", "3", "--json", "--timeout", "10", server=broker_process)
    assert got.returncode == 0, got.stderr
    records = [json.loads(line) for line in got.stdout.splitlines()]
    assert [r["payload"] for r in records] == ["a", "b", "c"]
    assert records[0]["attributes"] == {"kind": "test", "x": "1=2"}
    assert records[0]["channel"] == "lines" and records[0]["attempt"] == 1
    assert set(records[0]) == {"channel", "seq", "id", "payload", "attributes", "publish_time", "attempt"}


def test_publish_with_id_reports_duplicates(broker_process: str) -> None:
    first = cli("publish", "dup", "x", "--id", "cmd-1", server=broker_process)
    second = cli("publish", "dup", "x", "--id", "cmd-1", server=broker_process)
    assert first.stdout.strip() == "seq 1"
    assert second.stdout.strip() == "seq 1 (duplicate)"


def test_subscribe_timeout(broker_process: str) -> None:
    got = cli("subscribe", "empty", "--count", "1", "--timeout", "0.5", server=broker_process)
    assert got.returncode == 1
    assert got.stderr.splitlines() == ["error: no message within 0.5 s"]


def test_broker_unreachable_is_one_error_line() -> None:
    for args in (("publish", "x", "y"), ("subscribe", "x", "--count", "1")):
        got = cli(*args, "--server", "127.0.0.1:1")
        assert got.returncode == 1
        lines = got.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), got.stderr
        assert "127.0.0.1:1" in lines[0] and "pushchannel serve" in lines[0]
        assert "Traceback" not in got.stderr


def test_bad_channel_is_one_error_line(broker_process: str) -> None:
    got = cli("publish", "bad channel!", "x", server=broker_process)
    assert got.returncode == 1
    (line,) = got.stderr.splitlines()
    assert line.startswith("error: ") and "A-Z a-z 0-9" in line


def test_payloads_over_the_limits_are_one_error_line(broker_process: str) -> None:
    """A line over the broker's payload limit is refused by the broker; one over gRPC's 16 MiB
    frame limit never leaves the client. Either way: one line naming the sizes, nothing stored."""
    over_payload = cli("publish", "big", stdin="a" * ((1 << 20) + 1) + "\n", server=broker_process)
    over_frame = cli("publish", "big", stdin="a" * (17 << 20) + "\n", server=broker_process)
    for got, size in ((over_payload, "1048577"), (over_frame, "17,825,8")):
        assert got.returncode == 1, got.stderr
        (line,) = got.stderr.splitlines()
        assert line.startswith("error: ") and size in line, line
    assert "nothing was sent" in over_frame.stderr and "CLIENT:" not in over_frame.stderr
    assert cli("channel", "big", server=broker_process).returncode == 1  # never created


def test_usage_errors_exit_2() -> None:
    assert cli("subscribe", "x", "--count", "0").returncode == 2
    assert cli("subscribe", "x", "--from", "latest").returncode == 2
    assert cli("publish", "x", "--attr", "novalue", "m").returncode == 2
    assert cli("publish", "x", "a", "b", "--id", "same").returncode == 1  # one id, two messages
    assert cli().returncode == 2


def test_version() -> None:
    got = cli("--version")
    assert got.returncode == 0 and got.stdout.strip() == "pushchannel 0.1.0"
