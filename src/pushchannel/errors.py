"""The one exception tree of pushchannel, shared by the broker core, the server and the SDK.

::

    PushChannelError                 (code: the gRPC status name it travels as)
    ├── InvalidArgument              INVALID_ARGUMENT     bad channel name, payload too large, ...
    ├── NotFound                     NOT_FOUND            no such channel or group (admin)
    ├── FailedPrecondition           FAILED_PRECONDITION  Subscribe without Open first, ...
    ├── ResourceExhausted            RESOURCE_EXHAUSTED   channel full (policy reject), disk full
    ├── Unavailable                  UNAVAILABLE          store down, broker shutting down
    ├── Unauthenticated              UNAUTHENTICATED      no or bad token
    ├── PermissionDenied             PERMISSION_DENIED    channel outside the token's rights
    ├── DeadlineExceeded             DEADLINE_EXCEEDED    the caller's deadline passed
    ├── Cancelled                    CANCELLED            the call was cancelled
    └── InternalError                INTERNAL             a bug on the other side (and UNKNOWN etc.)

Foreign errors (sqlite3, redis, grpc) are translated into this tree once, where they enter.
The server picks status codes from ``code`` in one place; the SDK maps codes back with
:func:`error_for_code`. Only ``Unavailable`` (and, for idempotent calls, ``DeadlineExceeded``)
are worth retrying.
"""

from __future__ import annotations

from typing import ClassVar


class PushChannelError(Exception):
    """Root of every error pushchannel raises on purpose."""

    code: ClassVar[str] = "UNKNOWN"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message or self.code.lower().replace("_", " ")


class InvalidArgument(PushChannelError):
    code = "INVALID_ARGUMENT"


class NotFound(PushChannelError):
    code = "NOT_FOUND"


class FailedPrecondition(PushChannelError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(PushChannelError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(PushChannelError):
    code = "UNAVAILABLE"
    retryable = True


class Unauthenticated(PushChannelError):
    code = "UNAUTHENTICATED"


class PermissionDenied(PushChannelError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(PushChannelError):
    code = "DEADLINE_EXCEEDED"
    retryable = True


class Cancelled(PushChannelError):
    code = "CANCELLED"


class InternalError(PushChannelError):
    code = "INTERNAL"


_BY_CODE: dict[str, type[PushChannelError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Cancelled,
        InternalError,
    )
}
# Status families that have no class of their own travel as their nearest kin.
_BY_CODE.update(
    {
        "OUT_OF_RANGE": InvalidArgument,
        "ALREADY_EXISTS": FailedPrecondition,
        "ABORTED": Unavailable,
        "UNIMPLEMENTED": InternalError,
        "DATA_LOSS": InternalError,
        "UNKNOWN": InternalError,
    }
)


def error_for_code(code_name: str, message: str) -> PushChannelError:
    """Build the exception for a gRPC status name such as ``"UNAVAILABLE"``."""
    return _BY_CODE.get(code_name, InternalError)(message)


__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PushChannelError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "error_for_code",
]
