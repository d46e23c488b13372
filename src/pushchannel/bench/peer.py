"""What a peer comparison in ``bench/peers/`` implements and may use.

A peer file is a Python module in the checkout's ``bench/peers/`` (names starting with ``_``
are skipped) with a function ``peers() -> list[Peer]``. ``pushchannel bench peers`` loads each
one, skips a peer whose :meth:`Peer.missing` gives a reason (printed), and runs the same
throughput and latency shapes as our own scenarios against it: the server on a free loopback
port, started by :meth:`Peer.start`, stopped by :meth:`Peer.stop` whatever happens.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pushchannel
from pushchannel.bench._load import LatencyParams, ThroughputParams
from pushchannel.bench._procs import BenchError, Process, free_port
from pushchannel.bench._stats import Counter, Pacer, age_ns, latency_figures, median, percentile, stamp

Figures = dict[str, float]

__all__ = [
    "BenchError",
    "Counter",
    "Figures",
    "LatencyParams",
    "Pacer",
    "Peer",
    "Process",
    "ThroughputParams",
    "age_ns",
    "find_peers_dir",
    "free_port",
    "latency_figures",
    "load_peers",
    "median",
    "percentile",
    "stamp",
    "stop_tasks",
]


class Peer:
    """A broker to compare with. ``throughput`` returns at least ``delivered_per_s``;
    ``latency`` returns ``p50_ms``, ``p99_ms``, ``p999_ms`` (see :func:`latency_figures`)."""

    name = "peer"
    description = ""

    def missing(self) -> str | None:
        """Why this peer cannot run here (a binary or a client library is missing), or None."""
        return None

    def versions(self) -> str:
        """The server's and the client library's versions, for the report."""
        return ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def throughput(self, p: ThroughputParams) -> Figures:
        raise NotImplementedError

    async def latency(self, p: LatencyParams) -> Figures:
        raise NotImplementedError

    @staticmethod
    def need_binary(name: str, package: str) -> str | None:
        """A skip reason when ``name`` is not on PATH."""
        if shutil.which(name) is None:
            return f"{name} not found (apt-get install {package})"
        return None

    @staticmethod
    def binary_version(argv: list[str]) -> str:
        """The first line ``argv`` prints (e.g. ``redis-server --version``), or ``?``."""
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    @staticmethod
    def dist_version(dist: str) -> str:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return f"{dist} ?"

    @staticmethod
    def need_module(module: str, package: str) -> str | None:
        """A skip reason when ``module`` cannot be imported."""
        if importlib.util.find_spec(module) is None:
            return f"Python module {module} not found (pip install {package})"
        return None


async def stop_tasks(tasks: list[asyncio.Task[None]], grace: float = 1.5, timeout: float = 5.0) -> None:
    """End reader tasks: first let them return by themselves for ``grace`` seconds (readers
    should stop once their counter is done), then cancel the rest and wait ``timeout`` seconds
    at most, since some client libraries do not finish a blocking read promptly when cancelled."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def find_peers_dir(explicit: Path | None = None) -> Path | None:
    """``bench/peers`` of the checkout: given, under the current directory, or beside the
    sources this pushchannel runs from (an editable install)."""
    candidates = (
        [explicit]
        if explicit is not None
        else [
            Path.cwd() / "bench" / "peers",
            Path(pushchannel.__file__).resolve().parents[2] / "bench" / "peers",
        ]
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def load_peers(directory: Path) -> tuple[list[Peer], list[str]]:
    """Every peer of every module in ``directory``, and why modules failed to load."""
    found: list[Peer] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"pushchannel_bench_peers_{path.stem}"
        try:
            module = _import(name, path)
            found.extend(module.peers())
        except Exception as e:  # a broken peer file must not stop the others
            problems.append(f"{path.name}: {type(e).__name__}: {e}")
    return found, problems


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
