"""Malformed request frames get ``INVALID_ARGUMENT``, not a traceback; and each call knows its
method name and context (:data:`CURRENT_METHOD`, :data:`CURRENT_CONTEXT`, for log lines).

gRPC parses each request before the servicer sees it; a frame that is not the protobuf it
claims to be makes grpc.aio log an ERROR with a traceback and answer ``UNKNOWN``, so a hostile
client could fill the log at will. :func:`guarded` wraps the handlers as they are registered:

- a unary request that does not parse never reaches the servicer; the call ends with
  ``INVALID_ARGUMENT`` ("malformed request: ...");
- in a request stream, the bad frame raises :class:`~pushchannel.errors.InvalidArgument` where
  the servicer reads it, which the servicer turns into that status like any other error.

Usage: ``add_BrokerServicer_to_server(servicer, guarded(server))``. The methods are served
through generic handlers only, not registered one by one (see
:meth:`_GuardedServer.add_registered_method_handlers`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from pushchannel.errors import InvalidArgument

__all__ = ["CURRENT_CONTEXT", "CURRENT_METHOD", "guarded"]

# The call being served (each call runs in a task of its own): for log lines.
CURRENT_METHOD: ContextVar[str] = ContextVar("pushchannel_method", default="")
CURRENT_CONTEXT: ContextVar[aio.ServicerContext[Any, Any] | None] = ContextVar(
    "pushchannel_context", default=None
)

Deserializer = Callable[[bytes], Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _GenericBase = grpc.GenericRpcHandler[Any, Any]
else:
    _GenericBase = grpc.GenericRpcHandler


class _Malformed:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _type_name(deserializer: Deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


def _message(name: str, exc: Exception) -> str:
    return f"malformed request: not a valid {name} message ({type(exc).__name__})"


def _lenient(deserializer: Deserializer) -> Deserializer:
    """For unary requests: a sentinel instead of an exception."""
    name = _type_name(deserializer)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Malformed(_message(name, exc))

    return parse


def _strict(deserializer: Deserializer) -> Deserializer:
    """For request streams: InvalidArgument where the servicer reads the frame."""
    name = _type_name(deserializer)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            raise InvalidArgument(_message(name, exc)) from None

    return parse


def _wrap(method: str, behavior: Callable[..., Any], check: bool) -> Callable[..., Any]:
    """``behavior`` that records its method name (for log lines) and, with ``check``, turns a
    unary request that did not parse into INVALID_ARGUMENT."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            CURRENT_METHOD.set(method)
            CURRENT_CONTEXT.set(context)
            if check and isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behavior(request, context):
                yield response

        return stream

    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        CURRENT_METHOD.set(method)
        CURRENT_CONTEXT.set(context)
        if check and isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return call


_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def _guard(method: str, handler: Handler) -> Handler:
    h: Any = handler
    kind = _KINDS[(bool(h.request_streaming), bool(h.response_streaming))]
    behavior = getattr(h, kind)
    if h.request_deserializer is None:
        return h._replace(**{kind: _wrap(method, behavior, False)})  # type: ignore[no-any-return]
    if h.request_streaming:
        return h._replace(  # type: ignore[no-any-return]
            request_deserializer=_strict(h.request_deserializer), **{kind: _wrap(method, behavior, False)}
        )
    return h._replace(  # type: ignore[no-any-return]
        request_deserializer=_lenient(h.request_deserializer), **{kind: _wrap(method, behavior, True)}
    )


class _GuardedHandler(_GenericBase):
    def __init__(self, inner: _GenericBase) -> None:
        self._inner = inner
        self._cache: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = handler_call_details.method
        try:
            return self._cache[method]
        except KeyError:
            pass
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        guarded_handler = _guard(method, handler)
        self._cache[method] = guarded_handler  # registered methods only: a bounded set
        return guarded_handler


class _GuardedServer:
    """Stands in for the server while generated code registers a servicer."""

    def __init__(self, server: aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[_GenericBase]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        """Not registered: the generic handler added just before serves these methods. grpc.aio's
        server keeps one pending request future per registered method and waits on all of them
        (``asyncio.wait``) for every incoming call, so each registered method costs every call
        a done-callback added and removed; with the broker's 13, that was ~11 us of CPU per
        unary call (the seed path's SubmitMessage, measured side by side)."""


def guarded(server: aio.Server) -> Any:
    """``server``, for ``add_*Servicer_to_server``: its handlers answer malformed frames with
    INVALID_ARGUMENT."""
    return _GuardedServer(server)
