"""The ``peers`` scenario: our throughput and latency shapes against Redis and NATS, from the
peer files in the checkout's ``bench/peers/``, with our own figures of the same run beside."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from pushchannel.bench import _load
from pushchannel.bench._procs import BenchError, start_broker
from pushchannel.bench._scenarios import (
    DELIVERED,
    OURS,
    P50,
    P99,
    P999,
    Options,
    ScenarioResult,
    SystemRuns,
)
from pushchannel.bench.peer import Peer, find_peers_dir, load_peers

PEER_METRICS = [DELIVERED, P50, P99, P999]


def _title(tp: _load.ThroughputParams, lat: _load.LatencyParams) -> str:
    return (
        f"throughput: {tp.producers} producers -> {tp.consumers} consumers, {tp.mode}, {tp.payload} B, "
        f"batches of {tp.batch}, {tp.messages:,} messages; latency: {lat.rate:,.0f} msg/s, "
        f"{lat.messages:,} messages"
    )


def _merge(tp_runs: SystemRuns, lat_runs: SystemRuns) -> SystemRuns:
    runs = [{**a, **b} for a, b in zip(tp_runs.runs, lat_runs.runs, strict=False)]
    return SystemRuns(runs=runs, error=tp_runs.error or lat_runs.error)


def ours_from(
    results: Sequence[ScenarioResult], tp: _load.ThroughputParams, lat: _load.LatencyParams
) -> SystemRuns | None:
    """Our figures from this run's throughput (memory store) and latency scenarios, when they
    had the very shapes the peers run."""
    t = next(
        (r for r in results if r.name == "throughput" and r.params == {"store": "memory", **_asdict(tp)}),
        None,
    )
    lt = next(
        (r for r in results if r.name == "latency" and r.params == {"store": "memory", **_asdict(lat)}),
        None,
    )
    if t is None or lt is None:
        return None
    return _merge(t.systems[OURS], lt.systems[OURS])


def _asdict(params: _load.ThroughputParams | _load.LatencyParams) -> dict[str, object]:
    return dataclasses.asdict(params)


async def run_peers(
    tp: _load.ThroughputParams,
    lat: _load.LatencyParams,
    options: Options,
    earlier: Sequence[ScenarioResult],
    peers_dir: Path | None = None,
) -> ScenarioResult:
    result = ScenarioResult(
        name="peers",
        title=_title(tp, lat),
        params={"throughput": _asdict(tp), "latency": _asdict(lat)},
        metrics=list(PEER_METRICS),
        systems={},
        ratio_metrics=[m.key for m in PEER_METRICS],
    )
    print(f"== peers: {result.title}", file=sys.stderr, flush=True)
    directory = find_peers_dir(peers_dir)
    if directory is None:
        result.skipped = "bench/peers not found: run from a pushchannel checkout (or give --peers-dir)"
        print(f"   skipped: {result.skipped}", file=sys.stderr)
        return result
    peers, problems = load_peers(directory)
    result.notes.extend(f"peer file failed to load: {p}" for p in problems)
    ours = ours_from(earlier, tp, lat)
    if ours is not None:
        result.systems[OURS] = ours
        result.notes.append("pushchannel: the figures of this run's throughput and latency scenarios")
    else:
        result.systems[OURS] = await _run_ours(tp, lat, options)
    for peer in peers:
        reason = peer.missing()
        if reason is not None:
            result.notes.append(f"{peer.name} skipped: {reason}")
            print(f"   {peer.name:<14} skipped: {reason}", file=sys.stderr, flush=True)
            continue
        result.systems[peer.name] = await _run_peer(peer, tp, lat, options)
        versions = await asyncio.to_thread(peer.versions)
        about = "; ".join(x for x in (peer.description, versions) if x)
        if about:
            result.notes.append(f"{peer.name}: {about}")
    return result


async def _timed(
    label: str, run: Callable[[], Awaitable[dict[str, float]]], runs: SystemRuns
) -> dict[str, float] | None:
    started = time.perf_counter()
    try:
        figures = await run()
    except (BenchError, OSError, TimeoutError) as e:
        runs.error = str(e) or type(e).__name__
        print(f"   {label}: failed: {runs.error}", file=sys.stderr, flush=True)
        return None
    except Exception as e:  # a peer's client library failing is a finding, not a crash
        runs.error = f"{type(e).__name__}: {e}"
        print(f"   {label}: failed: {runs.error}", file=sys.stderr, flush=True)
        return None
    shown = ", ".join(f"{k}={v:,.2f}" for k, v in figures.items() if k in {m.key for m in PEER_METRICS})
    print(f"   {label}: {shown} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return figures


async def _run_peer(
    peer: Peer, tp: _load.ThroughputParams, lat: _load.LatencyParams, options: Options
) -> SystemRuns:
    runs = SystemRuns()
    try:
        await asyncio.to_thread(peer.start)
    except (BenchError, OSError) as e:
        runs.error = f"cannot start: {e}"
        print(f"   {peer.name:<14} {runs.error}", file=sys.stderr, flush=True)
        peer.stop()
        return runs
    try:
        await _timed(f"{peer.name:<14} warm-up", lambda: peer.throughput(_warm(tp)), runs)
        for i in range(options.repeat):
            if runs.error is not None:
                break
            label = f"{peer.name:<14} run {i + 1}/{options.repeat}"
            a = await _timed(label, lambda: peer.throughput(tp), runs)
            b = await _timed(label, lambda: peer.latency(lat), runs) if a is not None else None
            if a is not None and b is not None:
                runs.runs.append({**a, **b})
    finally:
        peer.stop()
    return runs


async def _run_ours(tp: _load.ThroughputParams, lat: _load.LatencyParams, options: Options) -> SystemRuns:
    runs = SystemRuns()
    server = await asyncio.to_thread(start_broker, "memory")
    try:
        await _timed(f"{OURS:<14} warm-up", lambda: _load.throughput(server.target, _warm(tp)), runs)
        for i in range(options.repeat):
            if runs.error is not None:
                break
            label = f"{OURS:<14} run {i + 1}/{options.repeat}"
            a = await _timed(label, lambda: _load.throughput(server.target, tp), runs)
            b = (
                await _timed(label, lambda: _load.latency(server.target, lat), runs)
                if a is not None
                else None
            )
            if a is not None and b is not None:
                runs.runs.append({**a, **b})
    finally:
        server.stop()
    return runs


def _warm(tp: _load.ThroughputParams) -> _load.ThroughputParams:
    return dataclasses.replace(tp, messages=min(tp.messages, max(tp.batch * tp.producers, tp.messages // 10)))
