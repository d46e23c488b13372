"""``pushchannel bench``: the broker's benchmark harness.

Each scenario (``throughput``, ``latency``, ``fanout``, ``streams``, ``seed``) runs the same load
code, over raw gRPC stubs, against three servers each in a process of its own: the broker
(``pushchannel serve``), the raw-gRPC ceiling for the scenario's shape, and a minimal broker
(publish -> ``asyncio.Queue`` -> stream). It reports the median of ``--repeat`` runs of each and
the broker's figures as ratios to the baselines of the same run; ``peers`` does the same
throughput and latency shapes against Redis and NATS (``bench/peers/`` in the checkout).

Output: a table (default), ``--json``, ``--markdown FILE`` and ``--plot FILE.png``
(matplotlib: the ``bench`` extra). See ``docs/benchmarks.md``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run ``pushchannel bench`` with ``argv`` (without the program and command names)."""
    from pushchannel.bench._cli import main as run

    return run(argv)
