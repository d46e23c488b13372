"""The one place where errors become gRPC status codes."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from grpc import aio

from pushchannel.errors import PushChannelError

log = logging.getLogger("pushchannel.server")


def status_code(exc: PushChannelError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[exc.code]
    except KeyError:
        return grpc.StatusCode.UNKNOWN


async def abort(context: aio.ServicerContext[object, object], exc: BaseException) -> NoReturn:
    """End the call with the status that ``exc`` stands for; unexpected errors are logged as bugs."""
    if isinstance(exc, PushChannelError):
        await context.abort(status_code(exc), str(exc))
    log.error("internal error: %s", exc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
