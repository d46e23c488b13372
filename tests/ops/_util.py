"""Helpers for the operations tests: scraping the metrics endpoint, running the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def http_get(url: str) -> tuple[int, str]:
    """GET ``url`` off the event loop (the broker answers on it); status and body."""
    return await asyncio.to_thread(_get, url)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: {(name, sorted labels): value}."""
    status, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def cli(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for name in ("PUSHCHANNEL_TOKEN", "PUSHCHANNEL_SERVER"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "pushchannel.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
