"""The one place where errors become gRPC statuses, for every RPC.

Expected failures are :class:`ferry.errors.FerryError` and reach the client
with their own code and message.  Anything else is a bug: it is logged with
its traceback and the client gets INTERNAL without internals.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ferry.errors import Code, FerryError, error_for_code

log = logging.getLogger("ferry.gateway")

T = TypeVar("T")

_GRPC_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def grpc_code(code: int) -> grpc.StatusCode:
    return _GRPC_CODES.get(code, grpc.StatusCode.UNKNOWN)


def describe(exc: BaseException, rpc: str) -> tuple[int, str]:
    """(canonical code, client-facing message) for any exception raised by an RPC."""
    if isinstance(exc, FerryError):
        return int(exc.code), exc.message
    log.exception("bug in %s", rpc, exc_info=exc)
    return int(Code.INTERNAL), f"internal error in {rpc} ({type(exc).__name__}); see the gateway log"


def raise_for_reply(code: int, body: bytes) -> bytes:
    """A worker's reply: the response bytes, or its error raised as a typed FerryError."""
    if code == Code.OK:
        return body
    raise error_for_code(code, body.decode("utf-8", "replace"))


def unary(rpc: str, fn: Callable[[Any, Any], Awaitable[T]]) -> Callable[[Any, Any], Awaitable[T]]:
    """Wrap a unary handler so every failure leaves through ``describe``."""

    @functools.wraps(fn)
    async def handler(request: Any, context: Any) -> T:
        try:
            return await fn(request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, message = describe(exc, rpc)
            await context.abort(grpc_code(code), message)
            raise AssertionError("unreachable: context.abort raises") from None

    return handler
