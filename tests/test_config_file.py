"""The TOML config file: values land in the frozen config, flags override the file, and a
wrong key or value names the file, the line and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pushchannel.config_file import ConfigError, load, parse_duration, parse_size
from tests.conftest import ROOT

GOOD = """
listen = "127.0.0.1:6000"
store = "memory://"
fsync = "full"
grace = "5s"

[delivery]
max_delivery_attempts = 4
ack_deadline = "45s"
heartbeat_interval = 5

[retention]
max_age = "2d"
max_bytes = "64MiB"

[limits]
max_payload = "256KiB"

[[channel]]
pattern = "telemetry.*"
max_age = "1h"
discard = "reject"
default_group = false

[[channel]]
pattern = "hosts.*"
max_messages = 500
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pushchannel.toml"
    path.write_text(text)
    return path


def test_a_full_file_lands_in_the_config(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    assert (cfg.listen, cfg.store_url, cfg.fsync, cfg.grace) == ("127.0.0.1:6000", "memory://", "full", 5.0)
    b = cfg.broker
    assert (b.max_delivery_attempts, b.default_ack_deadline, b.heartbeat_interval) == (4, 45.0, 5.0)
    assert b.limits.max_payload == 256 * 1024
    assert b.default_policy.max_age == 2 * 86400 and b.default_policy.max_bytes == 64 << 20
    tele = b.policy_for("telemetry.cpu")
    assert (tele.max_age, tele.discard, tele.default_group) == (3600.0, "reject", False)
    assert tele.max_bytes == 64 << 20, "a [[channel]] inherits what it does not set from [retention]"
    assert b.policy_for("hosts.a").max_messages == 500
    assert b.policy_for("other") == b.default_policy


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('listen = "127.0.0.1:1"\nlisten_port = 5\n', 2, "listen_port"),
        ('[delivery]\nmax_delivery_attempts = "many"\n', 2, "a whole number"),
        ('[retention]\nmax_age = "forever"\n', 2, "a duration"),
        ('[[channel]]\npattern = "a.*"\ndiscard = "sometimes"\n', 3, "drop-oldest"),
        ('[[channel]]\nmax_age = "1h"\n', 0, "a channel glob"),
        ('[limits]\nmax_payload = "lots"\n', 2, "a size"),
    ],
)
def test_a_wrong_key_or_value_names_file_line_and_expectation(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:" if line else f"{path}:"), message
    assert words in message


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "listen = \n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


def test_units() -> None:
    assert parse_duration("250ms") == 0.25 and parse_duration("7d") == 7 * 86400 and parse_duration(3) == 3.0
    assert parse_size("1GiB") == 1 << 30 and parse_size("10KB") == 10_000 and parse_size(7) == 7
    for bad in ("-1s", "1 week", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pushchannel.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )


def test_flags_override_the_file_in_print_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    proc = _serve("--config", str(path), "--listen", "127.0.0.1:7000", "--max-age", "3h", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert '"listen": "127.0.0.1:7000"' in proc.stdout
    assert '"max_age": 10800.0' in proc.stdout
    assert '"pattern": "telemetry.*"' in proc.stdout


def test_serve_with_a_bad_file_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nheartbeat_interval = "soon"\n')
    proc = _serve("--config", str(path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:2: delivery.heartbeat_interval"), (
        proc.stderr
    )
