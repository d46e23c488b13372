"""gRPC core settings a broker process takes from its environment, before gRPC is imported.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when ``grpc`` is imported; setting it later does
nothing. So ``pushchannel serve`` (and the benchmark's baseline servers, and the test suite,
so that they run the broker's gRPC stack) call :func:`use_fused_filters` first thing.

``fuse_filters`` merges the server's per-call filters (message size, HTTP, compression,
auth, ...) into one, and so shrinks every call's arena: 2.5 KB less RSS per idle host stream
on grpcio 1.85 (``pushchannel bench streams --client sdk --per-connection 100``: 25.8-26.4 ->
23.2-24.0 KB), with the same filters and limits in force. It is an experiment of gRPC's, so it
is turned on only on the grpcio versions it was measured on, and never over the operator's
own ``GRPC_EXPERIMENTS`` (set it, even empty, to choose otherwise). See docs/operations.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import metadata

__all__ = ["EXPERIMENT", "MEASURED_ON", "grpcio_minor", "use_fused_filters"]

EXPERIMENT = "fuse_filters"
#: The grpcio releases (major.minor) on which the experiment was measured and tested. A new
#: grpcio must be measured again before it is added (a test ties this to constraints.txt).
MEASURED_ON = frozenset({"1.85"})


def grpcio_minor() -> str:
    """The installed grpcio's ``major.minor``, read without importing gRPC ('' if unknown)."""
    try:
        version = metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        return ""
    return ".".join(version.split(".")[:2])


def use_fused_filters(environ: MutableMapping[str, str] | None = None) -> bool:
    """Turn ``fuse_filters`` on in ``environ`` (this process's environment by default) unless
    the operator set ``GRPC_EXPERIMENTS`` or the grpcio is one it was not measured on. True
    if the experiment is asked for in ``environ`` afterwards.

    For this process it must run before ``grpc`` is imported: after, it changes nothing and
    says so (False), since gRPC has already read its configuration.
    """
    own = environ is None
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    chosen = env.get("GRPC_EXPERIMENTS")
    if chosen is not None:
        return EXPERIMENT in (name.strip() for name in chosen.split(","))
    if grpcio_minor() not in MEASURED_ON or (own and "grpc" in sys.modules):
        return False
    env["GRPC_EXPERIMENTS"] = EXPERIMENT
    return True
