"""gRPC core's ``fuse_filters`` experiment: ``pushchannel serve`` turns it on before gRPC is
imported, never over the operator's own ``GRPC_EXPERIMENTS``, and only on a grpcio it was
measured on; the test suite runs its in-process brokers with it too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pushchannel._grpc_env import EXPERIMENT, MEASURED_ON, grpcio_minor, use_fused_filters
from tests import FUSED_FILTERS, STARTED_WITH_EXPERIMENTS
from tests.conftest import free_port, stop_process, wait_for_port
from tests.ops._util import ROOT

pytestmark = pytest.mark.timeout(60)


def test_the_pinned_grpcio_is_one_the_experiment_was_measured_on() -> None:
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    pinned = ".".join(pins["grpcio"].split(".")[:2])
    assert pinned in MEASURED_ON, (
        f"grpcio {pinned} is pinned: measure fuse_filters on it (docs/operations.md)"
    )
    assert grpcio_minor() == pinned


def test_it_is_asked_for_in_an_environment_without_a_choice() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert use_fused_filters(env) is True
    assert env == {"PATH": "/bin", "GRPC_EXPERIMENTS": EXPERIMENT}


@pytest.mark.parametrize(
    ("chosen", "on"),
    [("", False), ("-fuse_filters", False), ("event_engine_client", False), ("a, fuse_filters", True)],
)
def test_the_operators_choice_stands(chosen: str, on: bool) -> None:
    env = {"GRPC_EXPERIMENTS": chosen}
    assert use_fused_filters(env) is on
    assert env == {"GRPC_EXPERIMENTS": chosen}


def test_once_grpc_is_imported_it_changes_nothing_and_says_so() -> None:
    code = (
        "import os, grpc\n"
        "from pushchannel._grpc_env import use_fused_filters\n"
        "print(use_fused_filters(), 'GRPC_EXPERIMENTS' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_the_suite_runs_its_brokers_with_it() -> None:
    if STARTED_WITH_EXPERIMENTS is not None:
        pytest.skip(
            f"GRPC_EXPERIMENTS={STARTED_WITH_EXPERIMENTS!r} was set when the suite started: it stands"
        )
    assert FUSED_FILTERS is True
    assert os.environ["GRPC_EXPERIMENTS"] == EXPERIMENT


def _listening_record(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    port = free_port()
    log_path = tmp_path / "stderr.log"
    argv = [sys.executable, "-m", "pushchannel.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--store", "memory://", "--log-format", "json"]
    with log_path.open("wb") as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(port, proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in log_path.read_text().splitlines():
                if re.search(r'"event":\s*"listening"', line):
                    record: dict[str, object] = json.loads(line)
                    return record
            time.sleep(0.05)
        pytest.fail(f"no listening record in {log_path.read_text()!r}")
    finally:
        stop_process(proc)


def test_serve_turns_it_on_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env["PYTHONPATH"] = str(ROOT / "src")
    assert _listening_record(tmp_path, env)["grpc_experiments"] == EXPERIMENT


def test_serve_keeps_the_operators_choice(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), GRPC_EXPERIMENTS="")
    assert _listening_record(tmp_path, env)["grpc_experiments"] == ""
