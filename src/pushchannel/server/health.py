"""The standard gRPC health service and server reflection, so stock tools (grpc_health_probe,
grpcurl, Kubernetes gRPC probes) work with the broker.

Health is ``SERVING`` while the store answers a cheap probe, ``NOT_SERVING`` while it does
not, and ``NOT_SERVING`` for good once the broker starts draining. The statuses are kept for
the whole server (``""``) and for each of its services by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pushchannel._proto import push_pb2
from pushchannel._proto.pushchannel.v1 import broker_pb2
from pushchannel.server.guard import guarded

__all__ = ["SERVICE_NAMES", "Health", "HealthServicer"]

log = logging.getLogger("pushchannel.health")

#: The broker's own services, as health and reflection name them.
SERVICE_NAMES: tuple[str, ...] = (
    broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
    push_pb2.DESCRIPTOR.services_by_name["MessageSync"].full_name,
)
Response: TypeAlias = health_pb2.HealthCheckResponse
Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType
Ctx: TypeAlias = aio.ServicerContext[health_pb2.HealthCheckRequest, Response]

Probe = Callable[[], Awaitable[object]]


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped generated base
    """``grpc.health.v1.Health`` for asyncio. Unlike the reference servicer, a ``Watch`` ends
    (status OK) once it has told its client NOT_SERVING for the drain, so that open watches do
    not hold the server's shutdown for the whole grace period."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": Response.SERVING}
        self._changed = asyncio.Event()
        self._final = False

    def set(self, service: str, status: Status) -> None:
        """Ignored once draining: NOT_SERVING is final then."""
        if self._final:
            return
        self._status[service] = status
        self._notify()

    def drain(self) -> None:
        for service in self._status:
            self._status[service] = Response.NOT_SERVING
        self._final = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Ctx) -> Response:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return Response(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Ctx) -> None:
        last: Status | None = None
        while True:
            changed = self._changed  # taken before reading, so that no change goes unseen
            status = self._status.get(request.service, Response.SERVICE_UNKNOWN)
            if status != last:
                await context.write(Response(status=status))
                last = status
            if self._final:
                return
            await changed.wait()


class Health:
    """The health service, fed by a periodic store probe; :meth:`drain` on shutdown."""

    def __init__(self, probe: Probe, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        self.servicer = HealthServicer()
        self.serving = True
        self._probe = probe
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def add_to(self, server: aio.Server) -> None:
        """Register health and reflection (which lists every service, its own too)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, guarded(server))
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)

    async def start(self) -> None:
        self._set(True)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def drain(self) -> None:
        """NOT_SERVING from now on, whatever the store says."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.serving = False
        self.servicer.drain()

    async def check(self) -> bool:
        """Probe the store once; True if it answered in time."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._probe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.serving:
                log.warning(
                    "store probe failed, health is NOT_SERVING: %s",
                    exc,
                    extra={
                        "event": "health",
                        "status": "NOT_SERVING",
                        "error": str(exc) or type(exc).__name__,
                    },
                )
            return False
        if not self.serving:
            log.info(
                "store probe succeeded, health is SERVING", extra={"event": "health", "status": "SERVING"}
            )
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            ok = await self.check()
            if ok != self.serving:
                self._set(ok)

    def _set(self, serving: bool) -> None:
        self.serving = serving
        status = Response.SERVING if serving else Response.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            self.servicer.set(name, status)
