"""A small pipelining Redis client for the data path.

redis-py costs tens of microseconds of Python per command (connection pool,
retry wrappers, per-command parsing hooks), which on the request path is
more than Redis itself spends.  This client keeps one connection, writes
each call's commands in a single write, and matches replies in order as
hiredis parses them, so many concurrent callers share one socket without a
pool and a round trip costs one wake-up.

It is deliberately narrow: RESP2 commands in, hiredis values out.  Setup and
the control plane (consumer groups, statistics reads) keep using redis-py;
blocking commands (XREADGROUP BLOCK, BLPOP) get a client of their own so they
never hold up other replies, and so does a subscription (``listen``), whose
messages go straight to a callback.
Every call ends within its timeout; a timed-out or broken connection is
dropped and reopened by the next call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import hiredis

from ferry.redis_url import parse as parse_url

Command = Sequence[bytes | str | int | float]


class RespError(Exception):
    """Redis answered a command with an error (a bug or a misconfiguration, not an outage)."""

    @property
    def group_lost(self) -> bool:
        """The stream or its consumer group vanished (Redis lost its data): recreate, do not crash."""
        text = str(self)
        return text.startswith(("NOGROUP", "UNBLOCKED"))


# Encoded string arguments (command names, keys, script hashes, consumer names: a bounded set that
# repeats every call), each as one ready piece.
_PACKED: dict[str, bytes] = {}
_PACKED_MAX = 4096
_INLINE_MAX = 512  # bytes values up to this long are copied into one piece; longer ones go as they are


def pack_into(out: list[bytes], args: Command) -> None:
    """Append one command's RESP encoding to ``out``; long values are not copied (writev sends them)."""
    out.append(b"*%d\r\n" % len(args))
    for a in args:
        if type(a) is bytes:
            if len(a) <= _INLINE_MAX:
                out.append(b"$%d\r\n%b\r\n" % (len(a), a))
            else:
                out += (b"$%d\r\n" % len(a), a, b"\r\n")
        elif type(a) is str:
            piece = _PACKED.get(a)
            if piece is None:
                e = a.encode()
                piece = b"$%d\r\n%b\r\n" % (len(e), e)
                if len(_PACKED) < _PACKED_MAX:
                    _PACKED[a] = piece
            out.append(piece)
        elif type(a) is int:
            e = b"%d" % a
            out.append(b"$%d\r\n%b\r\n" % (len(e), e))
        else:
            e = a.encode() if isinstance(a, str) else a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(e), e))


class _Batch:
    __slots__ = ("future", "replies", "wanted")

    def __init__(self, wanted: int, future: asyncio.Future[list[Any]]) -> None:
        self.wanted = wanted
        self.replies: list[Any] = []
        self.future = future


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        # Kept: asyncio.get_running_loop() makes a getpid() system call on every use (Python
        # 3.11), and each call used it to make its future.
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.batches: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self._answer(reply)

    def _answer(self, reply: Any) -> None:
        batch = self.batches[0]
        batch.replies.append(reply)
        if len(batch.replies) == batch.wanted:
            self.batches.popleft()
            if not batch.future.done():
                batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        self.transport = None
        while self.batches:
            b = self.batches.popleft()
            if not b.future.done():
                b.future.set_exception(ConnectionError(f"Redis connection lost: {self.lost}"))


class _Subscribed(_Protocol):
    """A connection in subscribed mode: each published message goes to ``on_message(channel, data)``
    as it arrives; the other replies (SUBSCRIBE's confirmations, PING's pong) answer their callers."""

    def __init__(self, on_message: Callable[[bytes, bytes], None]) -> None:
        super().__init__()
        self.on_message = on_message

    def _answer(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
            self.on_message(reply[1], reply[2])
        else:
            super()._answer(reply)


class DataClient(Protocol):
    """What the data path needs of a Redis client: RespClient, or resp_cluster.ClusterClient."""

    url: str
    timeout_s: float

    @property
    def connections(self) -> int: ...

    async def execute(self, commands: Sequence[Command], *, timeout_s: float | None = None,
                      raise_errors: bool = True) -> list[Any]: ...

    def send_now(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]] | None: ...

    async def confirm(self, sent: asyncio.Future[list[Any]], *, raise_errors: bool = True) -> list[Any]: ...

    async def call(self, *args: bytes | str | int | float, timeout_s: float | None = None) -> Any: ...

    def drop(self) -> None: ...

    async def close(self) -> None: ...


class RespClient:
    def __init__(self, url: str, timeout_s: float, *,
                 protocol: Callable[[], _Protocol] = _Protocol) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._protocol = protocol
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        # Connections opened so far: a change tells a caller that writes it made on an
        # earlier connection may not have survived (gateway.dispatch re-sends requests).
        self.connections = 0

    async def _open(self) -> _Protocol:
        t = parse_url(self.url)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            if t.sentinel:
                # Here, not at the top: ferry.resp_sentinel asks the Sentinels with this module's client.
                from ferry import resp_sentinel
            if t.scheme == "unix":
                _, proto = await loop.create_unix_connection(self._protocol, t.path)
            else:
                host, port = await resp_sentinel.primary(t, self.timeout_s) if t.sentinel else (t.host, t.port)
                _, proto = await loop.create_connection(self._protocol, host, port, ssl=t.ssl_context())
            setup: list[Command] = []
            if t.password is not None:
                setup.append(("AUTH", t.username, t.password) if t.username else ("AUTH", t.password))
            if t.sentinel:
                setup.append(("ROLE",))
            if t.db:
                setup.append(("SELECT", t.db))
            if setup:
                replies = await self._send(proto, setup)
                errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
                if errors:
                    proto.transport.close()  # type: ignore[union-attr]
                    raise RespError(f"Redis refused the connection setup: {errors[0]}")
                if t.sentinel and replies[len(setup) - 1 - bool(t.db)][0] != b"master":
                    # The Sentinels have not noticed a failover yet: try again shortly.
                    proto.transport.close()  # type: ignore[union-attr]
                    raise RedisBusy(f"the primary the Sentinels named for {t.service!r} is not a primary (yet)")
        if t.sentinel:
            resp_sentinel.follow(t, proto, (host, port), self.timeout_s)
        return proto

    @staticmethod
    def _send(proto: _Protocol, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        fut: asyncio.Future[list[Any]] = proto.loop.create_future()
        if proto.transport is None:
            fut.set_exception(ConnectionError(f"Redis connection lost: {proto.lost}"))
            return fut
        proto.batches.append(_Batch(len(commands), fut))
        parts: list[bytes] = []
        for c in commands:
            pack_into(parts, c)
        proto.transport.writelines(parts)
        return fut

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.transport is not None:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is None or self._proto.transport is None:
                self._proto = await self._open()
                self.connections += 1
            return self._proto

    async def execute(self, commands: Sequence[Command], *, timeout_s: float | None = None,
                      raise_errors: bool = True) -> list[Any]:
        """Send ``commands`` in one write; their replies, in order."""
        proto = await self._connection()
        try:
            replies = await _within(self._send(proto, commands), self.timeout_s if timeout_s is None else timeout_s)
        except TimeoutError:
            self.drop()  # later replies would be matched to the wrong callers
            raise
        return self._checked(replies, raise_errors)

    def send_now(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]] | None:
        """Write ``commands`` immediately if connected (None if not); ``confirm`` the future later."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        return self._send(proto, commands)

    async def confirm(self, sent: asyncio.Future[list[Any]], *, raise_errors: bool = True) -> list[Any]:
        """Wait (within the timeout) for the replies of a ``send_now``."""
        try:
            replies = await _within(sent, self.timeout_s)
        except TimeoutError:
            self.drop()
            raise
        return self._checked(replies, raise_errors)

    def _checked(self, replies: list[Any], raise_errors: bool) -> list[Any]:
        if any(isinstance(r, hiredis.ReplyError) and "READONLY" in str(r) for r in replies):
            # A failover demoted the server this connection reaches: reconnect (and, with
            # Sentinel, ask again where the primary is) on the next call.
            self.drop()
        if raise_errors:
            raise_first_error(replies)
        return replies

    async def call(self, *args: bytes | str | int | float, timeout_s: float | None = None) -> Any:
        return (await self.execute([args], timeout_s=timeout_s))[0]

    def drop(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()
        self._proto = None

    async def close(self) -> None:
        self.drop()


async def _within(fut: asyncio.Future[list[Any]], timeout_s: float) -> list[Any]:
    """The future's result, or TimeoutError after ``timeout_s``: one timer on the future's own loop,
    where ``asyncio.timeout`` costs a context manager, a task lookup and two loop lookups per call."""
    timer = fut.get_loop().call_later(timeout_s, _time_out, fut, timeout_s)
    try:
        return await fut
    finally:
        timer.cancel()


def _time_out(fut: asyncio.Future[list[Any]], timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"Redis did not answer within {timeout_s:g}s"))


async def listen(url: str, timeout_s: float, channels: Sequence[str],
                 on_message: Callable[[bytes, bytes], None], *, ping_s: float = 1.0) -> None:
    """Subscribe to ``channels`` and hand each message to ``on_message(channel, data)``, in the
    connection's own callback (no task or queue per message), until the connection fails: then it
    raises ConnectionError, TimeoutError or OSError, and the caller subscribes again.  A PING every
    ``ping_s`` proves the connection alive, so a silent one (a partition, a failover that kept the
    socket open) ends within ``ping_s + timeout_s``.  ``on_message`` must not raise."""
    client = RespClient(url, timeout_s, protocol=lambda: _Subscribed(on_message))
    try:
        # One SUBSCRIBE per channel: each has one confirmation, so replies match commands.
        await client.execute([("SUBSCRIBE", ch) for ch in channels])
        subscribed = client.connections
        while True:
            await asyncio.sleep(ping_s)
            await client.execute([("PING",)])
            if client.connections != subscribed:
                # Closed while idle (a Sentinel switch, CLIENT KILL): the PING reconnected, but
                # the new connection subscribes to nothing.
                raise ConnectionError("the subscription's connection was closed")
    finally:
        await client.close()


class RedisBusy(ConnectionError):
    """Redis is up but cannot serve yet (loading its data, busy script, failing over): retry later."""


# Error replies that say "not now" rather than "wrong": treated like an outage (retried).
# READONLY: the primary was demoted by a failover (the client reconnects and asks again).
TRANSIENT = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY")


def is_transient(reply: Any) -> bool:
    """An error reply that means "not now" (retry later) rather than "wrong"."""
    if not isinstance(reply, hiredis.ReplyError):
        return False
    text = str(reply)
    # A script's write refused by a demoted primary says READONLY inside an ERR.
    return text.startswith(TRANSIENT) or "READONLY" in text


def raise_first_error(replies: list[Any]) -> None:
    for r in replies:
        if isinstance(r, hiredis.ReplyError):
            if is_transient(r):
                raise RedisBusy(str(r))
            raise RespError(str(r))


def range_entries(entries: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Decode an XRANGE reply (or one stream's part of an XREAD reply) into [(entry id, fields)]."""
    decoded = []
    for entry_id, flat in entries or ():
        if flat is None:
            continue  # deleted while pending; nothing to deliver
        it = iter(flat)
        decoded.append((entry_id, dict(zip(it, it, strict=True))))
    return decoded


def stream_entries(reply: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """Decode an XREAD/XREADGROUP reply into (stream, [(entry id, fields)])."""
    return [(stream, range_entries(entries)) for stream, entries in reply or ()]
