"""Output: the table, the JSON document, the Markdown page and the chart, all from one
:class:`Report` (so every figure and ratio shown comes from the same run)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pushchannel.bench._scenarios import OURS, SYSTEM_LABELS, Metric, ScenarioResult
from pushchannel.bench._targets import TargetCheck

SCHEMA_VERSION = 1


@dataclass
class Report:
    command: str
    started: str
    duration_s: float
    machine: dict[str, Any]
    options: dict[str, Any]
    results: list[ScenarioResult]
    targets: list[TargetCheck]
    warnings: list[str] = field(default_factory=list)


def label(system: str) -> str:
    return SYSTEM_LABELS.get(system, system)


def _num(value: float, digits: int) -> str:
    if not math.isfinite(value):
        return "-"
    if digits == 0 and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{max(digits, 1) if abs(value) < 100 else digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _rows(result: ScenarioResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per system, then one per ratio of ours to a baseline."""
    metrics = result.metrics
    header = ["system", *(m.label for m in metrics)]
    rows: list[list[str]] = []
    for system, runs in result.systems.items():
        if runs.error is not None and not runs.runs:
            rows.append([label(system), f"failed: {runs.error}", *([""] * (len(metrics) - 1))])
            continue
        rows.append([label(system), *(_num(runs.median(m.key), m.digits) for m in metrics)])
    ratios = result.ratios()
    for system in result.systems:
        if system == OURS:
            continue
        cells = [
            _ratio(ratios.get(m.key, {}).get(system)) if m.key in result.ratio_metrics else ""
            for m in metrics
        ]
        if any(c not in ("", "-") for c in cells):
            rows.append([f"{label(OURS)} / {label(system)}", *cells])
    return header, rows


def _repeat_text(result: ScenarioResult) -> str:
    counts = {len(r.runs) for r in result.systems.values() if r.runs}
    if not counts:
        return "no runs"
    n = max(counts)
    return f"median of {n} run{'s' if n != 1 else ''}"


def _params_text(result: ScenarioResult) -> str:
    store = result.params.get("store")
    return f"store {store}, " if isinstance(store, str) else ""


# -- text ------------------------------------------------------------------------------------------


def table(report: Report) -> str:
    out: list[str] = []
    for result in report.results:
        out.append(f"{result.label}: {result.title}")
        if result.skipped is not None:
            out.append(f"  skipped: {result.skipped}")
            out.append("")
            continue
        out.append(f"  ({_params_text(result)}{_repeat_text(result)})")
        header, rows = _rows(result)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            out.append("  " + "  ".join(cells).rstrip())
        out.extend(f"  note: {n}" for n in result.notes)
        out.append("")
    if report.targets:
        out.append("targets (issue #8):")
        for t in report.targets:
            out.append(
                f"  {_verdict(t):<11} {t.name}: {t.goal}; measured {t.value}{f' ({t.why})' if t.why else ''}"
            )
        out.append("")
    out.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(out).rstrip() + "\n"


def _verdict(t: TargetCheck) -> str:
    return "MET" if t.met else ("not judged" if t.met is None else "NOT MET")


# -- JSON ------------------------------------------------------------------------------------------


def to_json(report: Report) -> dict[str, Any]:
    scenarios = []
    for r in report.results:
        systems = {}
        for name, runs in r.systems.items():
            keys = sorted({k for run in runs.runs for k in run})
            systems[name] = {
                "label": label(name),
                "error": runs.error,
                "runs": runs.runs,
                "median": {k: _finite(runs.median(k)) for k in keys},
            }
        scenarios.append(
            {
                "name": r.name,
                "label": r.label,
                "title": r.title,
                "params": r.params,
                "skipped": r.skipped,
                "metrics": [asdict(m) for m in r.metrics],
                "systems": systems,
                "ratios": {k: {s: _finite(v) for s, v in d.items()} for k, d in r.ratios().items()},
                "notes": r.notes,
            }
        )
    return {
        "schema": SCHEMA_VERSION,
        "command": report.command,
        "started": report.started,
        "duration_s": round(report.duration_s, 1),
        "machine": report.machine,
        "options": report.options,
        "scenarios": scenarios,
        "targets": [asdict(t) for t in report.targets],
        "warnings": report.warnings,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- Markdown --------------------------------------------------------------------------------------


def markdown(report: Report, plot: Path | None, markdown_path: Path) -> str:
    m = report.machine
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `pushchannel bench`: do not edit by hand, run the command below again. -->",
        "",
        "All figures on this page come from **one run** of:",
        "",
        "```",
        report.command,
        "```",
        "",
        f"Started {report.started}, took {report.duration_s / 60:.1f} min. "
        f"Each figure is the median of the runs shown; every ratio divides two figures of this run.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m.get('cpu')} ({m.get('cores')} cores) |",
        f"| memory | {m.get('memory_gib')} GiB |",
        f"| OS | {m.get('os')} |",
        f"| Python | {m.get('python')} |",
        f"| grpcio / protobuf | {m.get('grpcio')} / {m.get('protobuf')} |",
        f"| event loop | {'uvloop ' + str(m.get('uvloop')) if m.get('uvloop') else 'asyncio'} |",
        f"| gRPC core experiments (every server) | {m.get('grpc_experiments') or 'none'} |",
        f"| load average at start | {m.get('loadavg')} |",
        "",
        "Processes: one server process (the broker, a baseline or a peer) and one load process "
        "(`pushchannel bench` itself: producers and consumers on one event loop), on loopback. "
        "The baselines are measured in the same run as the broker, with the same load code:",
        "",
        "- **raw gRPC**: a bare `grpc.aio` server that answers publishes with pre-built responses and "
        "streams pre-built frames (the broker's own `DeliveryBatch`/`MessageReply` types) of the "
        "scenario's shape: the ceiling of gRPC in Python for that traffic.",
        "- **minimal broker**: publish -> `asyncio.Queue` -> stream, with no store, acks or flow "
        "control: the least a broker can cost in Python.",
        "",
        "Every process, the load's and each server's, runs with the broker's garbage-collector "
        "settings (`pushchannel._gc`, see docs/operations.md): the baselines differ from the broker "
        "in their servicers only. Every server process, the baselines too, also runs with the gRPC "
        "core experiments `pushchannel serve` turns on (`pushchannel._grpc_env`, see "
        "docs/operations.md), so the ceiling is measured on the broker's gRPC stack. "
        "Each run starts on a quiet machine: the load process collects "
        "its garbage, then waits (up to 3 s) for a 0.2 s window in which the machine used under "
        "a tenth of a core, so that no run pays for what the run before left behind.",
        "",
    ]
    if report.targets:
        out += ["## Targets (issue #8)", "", "| target | goal | measured | verdict |", "|---|---|---|---|"]
        for t in report.targets:
            verdict = _verdict(t) + (f" ({t.why})" if t.why else "")
            out.append(f"| {t.name} | {t.goal} | {t.value} | {verdict} |")
        out.append("")
    for r in report.results:
        out += [f"## {r.label}", "", f"{r.title}.", ""]
        if r.skipped is not None:
            out += [f"Skipped: {r.skipped}", ""]
            continue
        out += [f"{_params_text(r).capitalize()}{_repeat_text(r)}.", ""]
        header, rows = _rows(r)
        out.append("| " + " | ".join(header) + " |")
        out.append("|---" + "|---:" * (len(header) - 1) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in rows)
        out.append("")
        out.extend(f"- {n}" for n in r.notes)
        if r.notes:
            out.append("")
    if plot is not None:
        try:
            rel = plot.resolve().relative_to(markdown_path.resolve().parent)
        except ValueError:
            rel = plot.resolve()
        out += ["## Chart", "", f"![benchmark chart]({rel.as_posix()})", ""]
    if report.warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    return "\n".join(out)


# -- chart -----------------------------------------------------------------------------------------


def plot(report: Report, path: Path) -> None:
    """One small panel per headline metric of each scenario, one bar per system (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[ScenarioResult, Metric]] = [
        (r, m) for r in report.results if r.skipped is None for m in r.metrics if m.key in r.ratio_metrics
    ]
    cols = 4
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every = list(dict.fromkeys(s for r, _ in panels for s in r.systems))
    for ax, (r, m) in zip(axes.flat, panels, strict=False):
        systems = [s for s in r.systems if math.isfinite(r.median(s, m.key))]
        values = [r.median(s, m.key) for s in systems]
        bars = ax.bar(
            range(len(systems)),
            values,
            color=[colours[every.index(s) % len(colours)] for s in systems],
        )
        ax.bar_label(bars, labels=[_num(v, m.digits) for v in values], fontsize=7)
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels([label(s) for s in systems], fontsize=7, rotation=20, ha="right")
        better = "higher" if m.higher_is_better else "lower"
        ax.set_title(f"{r.label}: {m.label}\n({better} is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    info = report.machine
    cpu, cores, python = info.get("cpu"), info.get("cores"), info.get("python")
    fig.suptitle(f"pushchannel bench, one run: {cpu}, {cores} cores, Python {python}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
