"""The wheel builds, installs into a fresh virtualenv and gives a working ``pushchannel``
command. Offline: the build uses this environment's setuptools, the install takes the wheel
alone, and the fresh venv finds grpcio and friends in this environment's site-packages through
a ``.pth`` file placed after its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.ops._util import ROOT

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


# Without the test run's PYTHONPATH, which points at the source tree.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=90, env=ENV)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_wheel_installs_the_pushchannel_command(tmp_path: Path) -> None:
    # Build from a copy, so the build leaves nothing behind in the working tree.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    _run(
        sys.executable, "-m", "pip", "wheel", project,
        "--no-deps", "--no-build-isolation", "--no-index", "--quiet", "-w", dist,
    )  # fmt: skip
    (wheel,) = dist.glob("pushchannel-*.whl")

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        wheel,
    )
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    )
    # Dependencies from this environment, after the venv's own site-packages: the wheel's
    # pushchannel comes first (this environment may hold an editable install of the tree).
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    command = venv / "bin" / "pushchannel"
    version = _run(command, "--version").stdout.strip()
    from pushchannel import __version__

    assert version == f"pushchannel {__version__}"
    where = _run(python, "-c", "import pushchannel; print(pushchannel.__file__)").stdout
    assert Path(where.strip()).is_relative_to(site), where
    # The installed package has everything the broker needs: generated code, typing marker,
    # and the servers' modules import with their dependencies.
    _run(
        python, "-c",
        "import pushchannel.server.app, pushchannel.server.metrics, pushchannel.server.health, "
        "pushchannel.cli.admin, pushchannel._proto.pushchannel.v1.broker_pb2",
    )  # fmt: skip
    assert (site / "pushchannel" / "py.typed").exists()
    printed = _run(command, "serve", "--metrics-listen", "--print-config").stdout
    assert '"metrics_listen": "127.0.0.1:9464"' in printed
