"""The benchmark harness: the shape of its output, and that every ratio it prints divides two
figures measured in the same run. Tiny counts (--quick); no test asserts a speed."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from pushchannel.bench import main
from pushchannel.bench._scenarios import (
    DELIVERED,
    MINIMAL,
    OURS,
    RAW,
    ScenarioResult,
    SystemRuns,
)
from pushchannel.bench._targets import judge

pytestmark = pytest.mark.timeout(60)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--quick", "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def test_throughput_json_has_every_system_and_same_run_ratios(capsys):
    doc = run_json(capsys, "throughput", "--repeat", "2")
    assert doc["schema"] == 1
    assert doc["command"].startswith("pushchannel bench throughput")
    for key in ("cores", "cpu", "python", "grpcio", "loadavg"):
        assert key in doc["machine"]
    assert doc["machine"]["grpc_experiments"] == os.environ["GRPC_EXPERIMENTS"]
    (scenario,) = doc["scenarios"]
    assert scenario["name"] == "throughput"
    assert scenario["params"]["store"] == "memory"
    assert set(scenario["systems"]) == {OURS, RAW, MINIMAL}
    for system in scenario["systems"].values():
        assert system["error"] is None
        assert len(system["runs"]) == 2
        values = [run["delivered_per_s"] for run in system["runs"]]
        assert system["median"]["delivered_per_s"] == pytest.approx(statistics.median(values))
    ours = scenario["systems"][OURS]["median"]["delivered_per_s"]
    for baseline in (RAW, MINIMAL):
        theirs = scenario["systems"][baseline]["median"]["delivered_per_s"]
        assert scenario["ratios"]["delivered_per_s"][baseline] == pytest.approx(ours / theirs)
    assert doc["targets"] == []  # --quick judges nothing


def test_table_shows_figures_and_ratios(capsys):
    assert main(["seed", "--quick", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed: ")
    for row in (
        "pushchannel ",
        "raw gRPC ",
        "minimal broker ",
        "pushchannel / raw gRPC ",
        "pushchannel / minimal",
    ):
        assert row in out
    assert "delivered msg/s" in out


def test_markdown_and_plot(capsys, tmp_path: Path):
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    assert main(["latency", "--quick", "--repeat", "1", "--markdown", str(md), "--plot", str(png)]) == 0
    capsys.readouterr()
    text = md.read_text()
    assert "pushchannel bench latency --quick" in text
    assert "## latency" in text and "| minimal broker |" in text
    assert "![benchmark chart](benchmarks.png)" in text
    assert png.read_bytes().startswith(b"\x89PNG")


def test_peers_are_skipped_with_a_reason(capsys, tmp_path: Path):
    (tmp_path / "fake_peer.py").write_text(
        "from pushchannel.bench.peer import Peer\n"
        "class Fake(Peer):\n"
        "    name = 'fake-peer'\n"
        "    def missing(self):\n"
        "        return 'fake-server not found (apt-get install fake-server)'\n"
        "def peers():\n"
        "    return [Fake()]\n"
    )
    (tmp_path / "broken.py").write_text("raise RuntimeError('no')\n")
    doc = run_json(capsys, "peers", "--repeat", "1", "--peers-dir", str(tmp_path))
    (scenario,) = doc["scenarios"]
    assert list(scenario["systems"]) == [OURS]  # measured in this run, next to the peers
    assert any("fake-peer skipped: fake-server not found" in n for n in scenario["notes"])
    assert any("broken.py" in n for n in scenario["notes"])


def test_unknown_scenario_is_a_usage_error(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


def _result(name: str, ours: list[float], minimal: list[float], **params: object) -> ScenarioResult:
    return ScenarioResult(
        name=name,
        title="t",
        params=dict(params),
        metrics=[DELIVERED],
        systems={
            OURS: SystemRuns(runs=[{"delivered_per_s": v} for v in ours]),
            MINIMAL: SystemRuns(runs=[{"delivered_per_s": v} for v in minimal]),
        },
        ratio_metrics=["delivered_per_s"],
    )


def test_ratio_is_median_over_median():
    r = _result("seed", [1.0, 9.0, 4.0], [2.0, 8.0, 100.0])
    assert r.ratios()["delivered_per_s"][MINIMAL] == pytest.approx(4.0 / 8.0)


def test_targets_are_judged_only_on_their_shape():
    small = _result("throughput", [200_000.0], [1.0], store="memory", mode="queue", messages=1000, batch=100)
    (check,) = judge([small])
    assert check.met is None and "not judged" in check.why
    big = _result("throughput", [50_000.0], [1.0], store="memory", mode="queue", messages=200_000, batch=100)
    (check,) = judge([big])
    assert check.met is False
    seed = _result("seed", [950.0], [1000.0])
    (check,) = judge([seed])
    assert check.met is True and math.isclose(0.95, float(check.value.split()[0]))


def test_fanout_reports_cpu_per_round_and_the_target_quotes_raw_grpc_from_the_same_run():
    def runs(ms: float, cpu: float) -> SystemRuns:
        return SystemRuns(runs=[{"one_to_all_ms": ms, "one_to_all_max_ms": ms, "server_cpu_ms": cpu}])

    result = ScenarioResult(
        name="fanout",
        title="t",
        params={"subscribers": 5000},
        metrics=[],
        systems={OURS: runs(380.0, 330.0), RAW: runs(370.0, 297.0)},
        ratio_metrics=["one_to_all_ms"],
    )
    (check,) = judge([result])
    assert check.met is False
    assert "raw gRPC 370.0 ms" in check.value and "297.0 ms per round" in check.value


def test_streams_are_judged_in_each_shape_beside_raw_grpc_in_the_same_shape():
    """Hosts on a connection each and hosts behind one gateway client are judged apart, each
    quoting the raw gRPC run that shares its streams per connection."""

    def streams(client: str, per_connection: int, ours: float, raw: float | None = None) -> ScenarioResult:
        figures = {"rss_per_stream_kb": ours, "opened": 10_000.0, "served": 10_000.0}
        systems = {OURS: SystemRuns(runs=[figures])}
        if raw is not None:
            systems[RAW] = SystemRuns(runs=[{**figures, "rss_per_stream_kb": raw}])
        params = {"streams": 10_000, "client": client, "per_connection": per_connection}
        return ScenarioResult("streams", "t", params, [], systems, ["rss_per_stream_kb"])

    checks = judge(
        [
            streams("raw", 1, 41.0, raw=45.0),
            streams("sdk", 1, 42.0),
            streams("raw", 100, 27.0, raw=30.0),
            streams("sdk", 100, 24.5),
        ]
    )
    own, gateway = checks
    assert "a connection each" in own.name and own.met is False
    assert "42.0 KB each" in own.value and "raw gRPC in the same shape 45.0 KB" in own.value
    assert "gateway client, 100 per connection" in gateway.name and gateway.met is True
    assert "raw gRPC in the same shape 30.0 KB" in gateway.value


def test_fanout_scenario_measures_server_and_load_cpu(capsys):
    (fanout,) = run_json(capsys, "fanout", "--repeat", "1")["scenarios"]
    for system in ("pushchannel", "raw", "minimal"):
        (run,) = fanout["systems"][system]["runs"]
        assert run["server_cpu_ms"] >= 0 and run["load_cpu_ms"] > 0


def test_each_run_starts_with_the_load_process_garbage_collected():
    """Garbage left in reference cycles by one run (the streams scenario's SDK clients leave
    millions of objects) is freed before the next run starts, not by a full pass inside it."""
    import asyncio
    import gc
    import weakref

    from pushchannel.bench._scenarios import Scenario, _measure

    class Node:
        other: Node | None = None

    freed: list[str] = []

    def leave_garbage() -> None:
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        weakref.finalize(a, freed.append, "a")

    seen_at_start: list[list[str]] = []

    async def driver(_server: Any, _params: Any) -> dict[str, float]:
        seen_at_start.append(list(freed))
        leave_garbage()
        return {DELIVERED.key: 1.0}

    sc = Scenario("gc", "gc", None, None, (OURS,), (DELIVERED,), (), driver)
    runs = SystemRuns()
    gc.disable()  # no automatic pass may free it in between: only the harness's own
    try:
        for i in range(2):
            server: Any = None  # the driver above talks to no server
            asyncio.run(_measure(sc, OURS, server, None, runs, f"run {i + 1}/2"))
    finally:
        gc.enable()
    assert seen_at_start == [[], ["a"]]
    assert len(runs.runs) == 2


def _spin_cpu(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU time, however busy the machine is."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _Meter:
    """This process's CPU seconds (all its threads): the machine's other work cannot reach it."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return time.process_time()


def test_a_run_waits_for_the_load_process_to_go_quiet():
    """Work left running in the load process (gRPC tearing down closed channels in its own
    threads) finishes before the next run starts; a quiet process starts after one window."""
    import asyncio
    import threading

    from pushchannel.bench._scenarios import _settle

    busy = threading.Thread(target=_spin_cpu, args=(0.5,))
    meter = _Meter()
    busy.start()
    try:
        asyncio.run(_settle(limit=60.0, busy_seconds=meter))
        assert not busy.is_alive(), "the run would have started while the process was busy"
        assert meter.reads > 2  # it waited more than one window
    finally:
        busy.join()
    meter = _Meter()
    asyncio.run(_settle(limit=60.0, busy_seconds=meter))
    assert meter.reads == 2  # one window, then the run starts


def test_a_run_waits_for_a_busy_machine_no_longer_than_its_limit():
    import asyncio

    from pushchannel.bench._scenarios import _settle

    reads = [0.0]

    def always_busy() -> float:  # a core's worth of work in every window, and more
        reads[0] += 10.0
        return reads[0]

    asyncio.run(_settle(window=0.01, limit=0.2, busy_seconds=always_busy))
    assert 2 < reads[0] / 10.0 <= 2 * (0.2 / 0.01) + 2


def test_the_machine_meter_counts_this_process_work():
    """/proc/stat's busy time includes a thread of ours spinning (on any machine, busy or not)."""
    from pushchannel.bench._scenarios import _busy_seconds

    before = _busy_seconds()
    _spin_cpu(0.3)
    assert _busy_seconds() - before >= 0.25
