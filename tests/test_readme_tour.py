"""The README's 60-second tour, command by command, against a `pushchannel serve` subprocess on
its default store (SQLite, in a temporary working directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_broker_process, stop_process


@pytest.fixture
def tour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)  # the default store lands in ./pushchannel-data
    proc, target = start_broker_process()
    try:
        yield target
    finally:
        stop_process(proc)
    assert (tmp_path / "pushchannel-data" / "pushchannel.db").exists()


def run(target: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PUSHCHANNEL_SERVER=target)
    return subprocess.run(
        [sys.executable, "-m", "pushchannel.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_the_tour(tour: str) -> None:
    ch = "hosts.berlin-1"
    assert run(tour, "publish", ch, "reboot", "update --now").stdout.split("\n")[:2] == ["seq 1", "seq 2"]
    first = run(tour, "publish", ch, "--attr", "kind=cmd", "--id", "cmd-42", "rotate-logs")
    assert first.returncode == 0 and first.stdout.strip() == "seq 3", first.stderr
    again = run(tour, "publish", ch, "--id", "cmd-42", "rotate-logs")
    assert again.stdout.strip() == "seq 3 (duplicate)"
    lines = run(tour, "publish", ch, stdin="one\ntwo\nthree\n")
    assert lines.stdout.split() == ["seq", "4", "seq", "5", "seq", "6"]

    got = run(tour, "subscribe", ch, "--count", "3", "--timeout", "10")
    assert got.returncode == 0 and got.stdout.splitlines() == ["reboot", "update --now", "rotate-logs"]
    got = run(tour, "subscribe", ch, "--json", "--count", "1", "--timeout", "10")
    record = json.loads(got.stdout)
    assert (record["payload"], record["seq"]) == ("one", 4)

    # A second durable group gets what is published after it was created, as the default does.
    audit = subprocess.Popen(
        [sys.executable, "-m", "pushchannel.cli", "subscribe", ch, "--group", "audit", "--count", "1"],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), PUSHCHANNEL_SERVER=tour),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the audit group exists
            info = run(tour, "channel", ch, "--json")
            if info.returncode == 0 and '"audit"' in info.stdout:
                break
            time.sleep(0.2)
        assert run(tour, "publish", ch, "for-both").returncode == 0
        out, _ = audit.communicate(timeout=20)
    finally:
        audit.kill()
        audit.wait()
    assert out.splitlines() == ["for-both"]
    rest = run(tour, "subscribe", ch, "--count", "3", "--timeout", "10")
    assert rest.stdout.splitlines() == ["two", "three", "for-both"]


def test_the_python_example(tour: str) -> None:
    """The README's Python example, run as written (against the test's broker), prints the
    message it published; run again, the next one: the first run's ack reached the broker."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"localhost:50051"' in code
    code = code.replace('"localhost:50051"', repr(tour))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for seq in (1, 2):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"{seq} b'reboot'"]
