"""The targets of the benchmark issue (#8), each judged only on a run of the shape it is
stated for, and only on figures of the same run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pushchannel.bench._scenarios import MINIMAL, OURS, RAW, ScenarioResult


@dataclass(frozen=True, slots=True)
class TargetCheck:
    name: str
    goal: str
    value: str
    met: bool | None  # None: not judged by this run
    why: str = ""


def _find(results: Sequence[ScenarioResult], name: str, **params: Any) -> ScenarioResult | None:
    for r in results:
        if r.name == name and r.skipped is None and all(r.params.get(k) == v for k, v in params.items()):
            return r
    return None


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:,.{digits}f}"


def _streams_check(st: ScenarioResult, runs: Sequence[ScenarioResult]) -> TargetCheck:
    n, per_connection = st.params["streams"], st.params["per_connection"]
    rss = st.median(OURS, "rss_per_stream_kb")
    opened, served = st.median(OURS, "opened"), st.median(OURS, "served")
    ok = rss <= 25 and opened == n and served == n
    judged = n >= 10_000 and bool(st.systems[OURS].runs)
    raw = ""
    for r in runs:
        same = r.params.get("client") == "raw" and r.params["per_connection"] == per_connection
        if same and RAW in r.systems and r.systems[RAW].runs:
            raw = f"; raw gRPC in the same shape {_fmt(r.median(RAW, 'rss_per_stream_kb'), 1)} KB"
    if st.params.get("client") != "sdk":
        who = f"raw stubs, {per_connection} per connection"
    elif per_connection > 1:
        who = f"one SDK gateway client, {per_connection} per connection"
    else:
        who = "SDK clients, a connection each"
    return TargetCheck(
        f"10,000 idle host streams ({who})",
        "<= 25 KB each, all opened at once and all served",
        f"{_fmt(rss, 1)} KB each, {_fmt(opened)} opened, {_fmt(served)} served of {n:,}" + raw,
        ok if judged else None,
        "" if judged else f"not judged: needs >= 10,000 streams (ran {n:,})",
    )


def judge(results: Sequence[ScenarioResult]) -> list[TargetCheck]:
    """The issue's targets, each judged only on a run of the shape it is stated for."""
    checks: list[TargetCheck] = []
    mem = _find(results, "throughput", store="memory", mode="queue")
    if mem is not None:
        v = mem.median(OURS, "delivered_per_s")
        big = mem.params["messages"] >= 100_000 and mem.params["batch"] >= 100
        checks.append(
            TargetCheck(
                "batched end-to-end, memory store",
                ">= 100,000 msg/s (aim 300,000)",
                f"{_fmt(v)} msg/s" + (" (aim met)" if v >= 300_000 else ""),
                (v >= 100_000) if big else None,
                "" if big else "not judged: needs >= 100,000 messages in batches >= 100",
            )
        )
    sql = next(
        (r for r in results if r.name == "throughput" and str(r.params["store"]).startswith("sqlite")), None
    )
    if mem is not None and sql is not None:
        if sql.skipped is not None or sql.systems[OURS].error is not None:
            checks.append(
                TargetCheck(
                    "SQLite store", ">= 0.5 x memory", "n/a", None, "not judged: the SQLite run failed"
                )
            )
        else:
            ratio = sql.median(OURS, "delivered_per_s") / mem.median(OURS, "delivered_per_s")
            same = {k: v for k, v in sql.params.items() if k != "store"} == {
                k: v for k, v in mem.params.items() if k != "store"
            }
            checks.append(
                TargetCheck(
                    "SQLite store",
                    ">= 0.5 x memory",
                    f"{ratio:.2f} x memory",
                    (ratio >= 0.5) if same else None,
                    "" if same else "not judged: different shapes",
                )
            )
    sd = _find(results, "seed")
    if sd is not None:
        ratio = sd.ratios().get("delivered_per_s", {}).get(MINIMAL, math.nan)
        checks.append(
            TargetCheck(
                "seed path",
                ">= 0.9 x minimal broker",
                f"{ratio:.2f} x minimal broker",
                (ratio >= 0.9) if math.isfinite(ratio) else None,
            )
        )
    lat = _find(results, "latency")
    if lat is not None:
        ratio = lat.ratios().get("p99_ms", {}).get(MINIMAL, math.nan)
        at_rate = abs(lat.params["rate"] - 1000) < 1
        checks.append(
            TargetCheck(
                "latency p99 at 1,000 msg/s",
                "<= 1.2 x minimal broker's",
                f"{_fmt(lat.median(OURS, 'p99_ms'), 2)} ms = {ratio:.2f} x minimal broker",
                (ratio <= 1.2) if at_rate and math.isfinite(ratio) else None,
                "" if at_rate else "not judged: rate is not 1,000 msg/s",
            )
        )
    # "All opened by SDK clients at once": the SDK runs are the ones judged when there are
    # any. Hosts each on a connection of their own, and hosts behind one gateway client that
    # shares connections, are two shapes, each judged and each beside raw gRPC in its shape.
    streams_runs = [r for r in results if r.name == "streams" and r.skipped is None]
    sdk_runs = [r for r in streams_runs if r.params.get("client") == "sdk"]
    for st in sdk_runs or streams_runs[:1]:
        checks.append(_streams_check(st, streams_runs))
    fo = _find(results, "fanout")
    if fo is not None:
        n = fo.params["subscribers"]
        ms = fo.median(OURS, "one_to_all_ms")
        judged = n >= 5000 and math.isfinite(ms)
        raw = ""
        if RAW in fo.systems and fo.systems[RAW].runs:  # the ceiling, from the same run
            raw = (
                f"; raw gRPC {_fmt(fo.median(RAW, 'one_to_all_ms'), 1)} ms, its server's CPU alone "
                f"{_fmt(fo.median(RAW, 'server_cpu_ms'), 1)} ms per round"
            )
        checks.append(
            TargetCheck(
                "one broadcast to 5,000 subscribers",
                "delivered to all within 200 ms",
                f"{_fmt(ms, 1)} ms (median round; worst {_fmt(fo.median(OURS, 'one_to_all_max_ms'), 1)} ms)"
                + raw,
                (ms <= 200) if judged else None,
                "" if judged else f"not judged: needs >= 5,000 subscribers (ran {n:,})",
            )
        )
    return checks
