"""The config file's operations keys, its one-line errors with file:line, and the documented
examples (docs/operations.md, deploy/pushchannel.toml), which must load as they are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pushchannel.config_file import ConfigError, load
from tests.ops._util import ROOT, cli

pytestmark = pytest.mark.timeout(60)


def _serve_print(*args: str) -> tuple[int, str, str]:
    done = cli("serve", *args, "--print-config")
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ('listen = "127.0.0.1:5000"\nmetric_listen = "127.0.0.1:9464"\n', 2, "known keys"),
        ('grace = "5s"\n\nlog_format = "xml"\n', 3, "one of 'text', 'json'"),
        ('metrics_listen = "localhost"\n', 1, "HOST:PORT"),
        ("metrics_listen = 9464\n", 1, "HOST:PORT"),
        ('fsync = "sometimes"\n', 1, "one of 'normal', 'full'"),
        ('[delivery]\nack_deadline = "soon"\n', 2, "a duration"),
        ('[retention]\nmax_bytes = "lots"\n', 2, "a size"),
        (
            '[[channel]]\npattern = "a.*"\nmax_age = "1h"\n[[channel]]\npattern = "b.*"\ncolour = "red"\n',
            6,
            "known keys",
        ),
        ('log_format = "json"\n[delivery]\nmetrics_listen = "127.0.0.1:1"\n', 3, "known keys"),
        ("delivery = 5\n", 1, "a table"),
    ],
)
def test_a_bad_key_or_value_is_one_line_with_file_and_line(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    code, out, err = _serve_print("--config", str(path))
    assert code == 1 and out == ""
    (only,) = err.splitlines()
    assert only.startswith(f"error: {path}:{line}: "), only
    assert expected in only
    with pytest.raises(ConfigError, match=re.escape(f"{path}:{line}: ")):
        load(path)


def test_operations_keys_from_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('metrics_listen = "127.0.0.1:9999"\nlog_format = "json"\n')
    code, out, err = _serve_print("--config", str(path))
    assert code == 0, err
    printed = json.loads(out)
    assert (printed["metrics_listen"], printed["log_format"]) == ("127.0.0.1:9999", "json")

    code, out, err = _serve_print("--config", str(path), "--metrics-listen", "--log-format", "text")
    assert code == 0, err
    printed = json.loads(out)
    assert (printed["metrics_listen"], printed["log_format"]) == ("127.0.0.1:9464", "text")

    code, out, _ = _serve_print()
    printed = json.loads(out)
    assert (printed["metrics_listen"], printed["log_format"]) == (None, "text")


def test_a_bad_flag_value_is_one_line() -> None:
    code, out, err = _serve_print("--metrics-listen", "nowhere")
    assert code == 1 and out == ""
    assert err.splitlines() == ["error: bad configuration: metrics_listen address 'nowhere' is not HOST:PORT"]


def _toml_blocks(markdown: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    (example,) = _toml_blocks((ROOT / "docs" / "operations.md").read_text())
    path = tmp_path / "pushchannel.toml"
    path.write_text(example)
    cfg = load(path)
    assert cfg.metrics_listen == "0.0.0.0:9464" and cfg.log_format == "json"
    assert cfg.store_url == "sqlite:////var/lib/pushchannel/pushchannel.db"
    assert cfg.auth_file == str(tmp_path / "auth.toml")
    assert [r.pattern for r in cfg.broker.policies] == ["telemetry.*", "billing.*"]
    assert cfg.broker.policy_for("telemetry.x").default_group is False
    assert cfg.broker.policy_for("billing.x").discard == "reject"
    assert cfg.broker.limits.max_payload == 256 << 10


def test_every_config_key_is_documented() -> None:
    from pushchannel import config_file

    doc = (ROOT / "docs" / "operations.md").read_text()
    tables = [
        config_file._SERVER_KEYS,
        config_file._DELIVERY_KEYS,
        config_file._POLICY_KEYS,
        config_file._LIMIT_KEYS,
        config_file._TLS_KEYS,
        config_file._AUTH_KEYS,
    ]
    keys = {"store", "pattern"} | {k for table in tables for k in table}
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/operations.md does not mention {missing}"


def test_the_container_config_loads() -> None:
    cfg = load(ROOT / "deploy" / "pushchannel.toml")
    assert cfg.listen == "0.0.0.0:50051"
    assert cfg.auth_file == str(ROOT / "deploy" / "auth.toml")  # /etc/pushchannel/auth.toml in the image
    assert cfg.metrics_listen == "0.0.0.0:9464"
