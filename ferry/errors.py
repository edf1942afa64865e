"""Ferry's error hierarchy.

Every expected failure is a :class:`FerryError` subclass that carries the
canonical gRPC status code it maps to.  The codes are the canonical numbers
from ``google.rpc.Code`` so that errors can travel inside Redis replies from a
worker to a gateway without either side importing grpc.  Translating an error
into a gRPC status happens in exactly one place: ``gateway.status``.
Anything that is *not* a FerryError reaching that boundary is a bug and is
reported as INTERNAL with a log line carrying the traceback.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Canonical status codes (same numbers as grpc.StatusCode / google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class FerryError(Exception):
    """Base class of every expected error; ``code`` says how clients see it."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FerryError):
    code = Code.INVALID_ARGUMENT


class NotFound(FerryError):
    code = Code.NOT_FOUND


class ResourceExhausted(FerryError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(FerryError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(FerryError):
    code = Code.UNAVAILABLE


class Unimplemented(FerryError):
    code = Code.UNIMPLEMENTED


class Unauthenticated(FerryError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(FerryError):
    code = Code.PERMISSION_DENIED


class Internal(FerryError):
    code = Code.INTERNAL


class ConfigError(FerryError):
    """A model repository, config file or setting is wrong; raised at load time."""

    code = Code.FAILED_PRECONDITION


def error_for_code(code: int, message: str) -> FerryError:
    """Rebuild a typed error from a status code that crossed a process boundary."""
    cls = _BY_CODE.get(code, FerryError)
    err = cls(message)
    if cls is FerryError:
        err.code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN
    return err


_BY_CODE: dict[int, type[FerryError]] = {
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.NOT_FOUND: NotFound,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.UNAVAILABLE: Unavailable,
    Code.UNIMPLEMENTED: Unimplemented,
    Code.INTERNAL: Internal,
}
