"""Processes the harness starts (the broker, the baselines, peer servers, py-spy) and what it
reads from them: their port, their RSS, the machine they run on. Every process started here is
stopped by its owner in a ``finally``, and at interpreter exit as a last resort."""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pushchannel
from pushchannel._grpc_env import use_fused_filters

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_live: set[subprocess.Popen[bytes]] = set()


class BenchError(Exception):
    """A run that could not be measured: said in one line."""


def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


atexit.register(_kill_leftovers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment for the servers: they import this very pushchannel, and the baselines
    run gRPC core with the experiments ``pushchannel serve`` turns on (pushchannel._grpc_env),
    so that the ceiling is measured on the same gRPC stack as the broker."""
    src = str(Path(pushchannel.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{path}" if path else src)
    use_fused_filters(env)
    return env


class Process:
    """A child process whose output goes to a log file (a pipe could fill up and stall it)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(
            self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        _live.add(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                return match
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name} did not start within {timeout:g} s: {self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the process now (VmRSS)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError as e:
            raise BenchError(f"cannot read the RSS of {self.name}: {e}") from None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) * 1024 if match else 0

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far (user and system, all threads)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError as e:
            raise BenchError(f"cannot read the CPU time of {self.name}: {e}") from None
        fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            _live.discard(proc)
            self._log.close()
            self.log_path.unlink(missing_ok=True)


class Server(Process):
    """A server on a loopback port it chose itself and announced as ``listening on HOST:PORT``."""

    def __init__(self, name: str, argv: Sequence[str], *, timeout: float = 30.0) -> None:
        super().__init__(name, argv, env=child_env())
        self.tempdir: str | None = None
        try:
            match = self.wait_for(_LISTENING, timeout)
        except BaseException:
            self.stop()
            raise
        self.target = f"{match.group(1)}:{match.group(2)}"

    def stop(self, timeout: float = 10.0) -> None:
        try:
            super().stop(timeout)
        finally:
            if self.tempdir is not None:
                shutil.rmtree(self.tempdir, ignore_errors=True)


def store_url(store: str) -> tuple[str, str | None]:
    """The broker's ``--store`` URL for a scenario's ``--store`` option, and a temporary
    directory to remove afterwards (``sqlite`` alone means a fresh database in one)."""
    if store == "memory":
        return "memory://", None
    if store == "sqlite":
        tempdir = tempfile.mkdtemp(prefix="pushchannel-bench-")
        return f"sqlite:///{tempdir}/bench.db", tempdir
    return store, None


def start_broker(store: str) -> Server:
    """``pushchannel serve`` on a free loopback port, in a process of its own."""
    url, tempdir = store_url(store)
    argv = [sys.executable, "-m", "pushchannel.cli", "serve", "--listen", "127.0.0.1:0", "--store", url]
    try:
        server = Server("pushchannel", argv)
    except BaseException:
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)
        raise
    server.tempdir = tempdir
    return server


def start_baseline(kind: str) -> Server:
    """The raw-gRPC ceiling or the minimal broker, in a process of its own."""
    argv = [sys.executable, "-m", "pushchannel.bench._servers", kind, "--listen", "127.0.0.1:0"]
    return Server(kind, argv)


class Profiler:
    """``py-spy record`` attached to a process until stopped; a no-op without py-spy."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        self.proc: Process | None = None
        exe = shutil.which("py-spy") or _beside_python("py-spy")
        if exe is None:
            print("note: py-spy not found: no profile (pip install py-spy)", file=sys.stderr)
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--output", str(output)]
        argv += ["--format", "speedscope"] if output.suffix == ".json" else []
        self.proc = Process("py-spy", argv)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc = self.proc.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        self.proc.stop()
        print(f"profile written to {self.output}", file=sys.stderr)


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    mem_kb = 0
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem_kb = int(match.group(1)) if match else 0
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "uvloop": version("uvloop"),
        "grpc_experiments": child_env().get("GRPC_EXPERIMENTS", ""),
        "pushchannel": pushchannel.__version__,
    }
