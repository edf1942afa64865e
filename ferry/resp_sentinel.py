"""Finding and following the primary the Redis Sentinels name (for ferry.resp's redis+sentinel:// URLs).

Why following matters: after a failover the old primary stays a writable primary until a Sentinel
converts it into a replica, which Sentinel does no sooner than ~8 s after it first sees the old primary
report the wrong role.  Whatever it accepts meanwhile is discarded when it resyncs from the new one.
A connection opened before the failover would go on writing there without an error: a broker's
acknowledgements "confirmed" and then forgotten, a subscription deaf to what is published on the new
primary, a reclaimer looking for pending entries on the wrong server.  So each process, per
(Sentinels, service) it uses, runs one task that asks a Sentinel every ``WATCH_S`` which server is the
primary and aborts the connections that point elsewhere; their callers get ConnectionError and
reconnect as after any outage (and the gateway re-sends what it wrote on them).

What this cannot close: writes made between the promotion and the moment this process notices
(``WATCH_S`` plus the Sentinels' own INFO period, 1 s during a failover) may still land on the old
primary.  The data path treats those like writes lost to asynchronous replication: requests are
re-sent by the gateway, acknowledgements are claimed back once idle (broker.reclaim).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Protocol

from ferry.redis_url import RedisTarget
from ferry.resp import RespClient, RespError

log = logging.getLogger(__name__)

# How often a process asks a Sentinel where the primary is while it holds connections to one.
WATCH_S = 0.5

Address = tuple[str, int]


class _Connection(Protocol):
    """What following needs of a connection: its transport (None once closed)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...


def _sentinel(host: str, port: int, timeout_s: float) -> RespClient:
    """A client for one Sentinel (ferry.resp's own, so timeouts and reconnects behave as elsewhere)."""
    return RespClient(f"redis://{host}:{port}", timeout_s)


async def _named(sentinel: RespClient, service: str) -> Address | None:
    """The primary ``sentinel`` names for ``service``, or None if it knows none; OSError, TimeoutError
    or RespError if it cannot be asked."""
    reply = await sentinel.call("SENTINEL", "get-master-addr-by-name", service)
    if isinstance(reply, list) and len(reply) == 2:
        return reply[0].decode(), int(reply[1])
    return None


# Per (Sentinels, service): the Sentinel that answered last in this process, asked first by
# everyone.  Sentinels may disagree for a moment during a failover; if a reconnect asked another
# Sentinel than the watch that dropped the connection, it could land back on the old primary and be
# dropped again, over and over until the two agreed.
_answered_last: dict[tuple[tuple[Address, ...], str], Address] = {}


def _in_order(t: RedisTarget) -> list[Address]:
    """``t``'s Sentinels, the one that answered last first, the rest in the URL's order."""
    last = _answered_last.get((t.sentinels, t.service))
    return sorted(t.sentinels, key=lambda addr: addr != last)  # stable: the URL's order otherwise


async def primary(t: RedisTarget, timeout_s: float) -> Address:
    """Ask the Sentinels, in turn, where the primary of ``t.service`` is now."""
    problems = []
    for host, port in _in_order(t):
        sentinel = _sentinel(host, port, timeout_s)
        try:
            addr = await _named(sentinel, t.service)
        except (OSError, TimeoutError, RespError) as exc:
            problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            await sentinel.close()
        if addr is not None:
            _answered_last[(t.sentinels, t.service)] = (host, port)
            return addr
        problems.append(f"{host}:{port}: knows no primary named {t.service!r}")
    raise ConnectionError(f"no Sentinel named a primary for {t.service!r} ({'; '.join(problems)})")


class _Watch:
    """Follows one service's primary for the connections of one event loop."""

    def __init__(self, t: RedisTarget, timeout_s: float) -> None:
        self.t = t
        self.timeout_s = timeout_s
        self.held: weakref.WeakKeyDictionary[_Connection, Address] = weakref.WeakKeyDictionary()
        self.task: asyncio.Task[None] | None = None

    def add(self, conn: _Connection, addr: Address) -> None:
        self.held[conn] = addr
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"sentinel-watch {self.t.service}")

    async def _run(self) -> None:
        # Connections kept between questions: one every WATCH_S would otherwise leave a socket in
        # TIME_WAIT each time.
        sentinels = {(h, p): _sentinel(h, p, self.timeout_s) for h, p in self.t.sentinels}
        try:
            while True:
                await asyncio.sleep(WATCH_S)
                if not any(c.transport is not None for c in list(self.held)):
                    return  # nothing left to follow: the next connection starts a new task
                named = await self._ask(sentinels)
                if named is not None:
                    self._drop_others(named)
        finally:
            for sentinel in sentinels.values():
                await sentinel.close()

    async def _ask(self, sentinels: dict[Address, RespClient]) -> Address | None:
        for addr in _in_order(self.t):
            sentinel = sentinels[addr]
            try:
                named = await _named(sentinel, self.t.service)
            except (OSError, TimeoutError, RespError, ValueError):
                sentinel.drop()  # down, slow, or not a Sentinel: ask the next one
                continue
            if named is None:
                continue  # it does not monitor the service (misconfigured, or just restarted)
            _answered_last[(self.t.sentinels, self.t.service)] = addr
            return named
        return None  # no Sentinel answered: keep the connections; a real outage shows on them

    def _drop_others(self, named: Address) -> None:
        dropped: set[Address] = set()
        for conn, addr in list(self.held.items()):
            transport = conn.transport
            if transport is not None and addr != named:
                transport.abort()
                dropped.add(addr)
            if transport is None or addr != named:
                del self.held[conn]
        if dropped:
            log.warning("the Sentinels now name %s:%d as the primary of %r: dropped the connections to %s",
                        named[0], named[1], self.t.service, ", ".join(f"{h}:{p}" for h, p in sorted(dropped)))


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], _Watch]] = (
    weakref.WeakKeyDictionary())


def follow(t: RedisTarget, conn: _Connection, addr: Address, timeout_s: float) -> None:
    """Abort ``conn`` (connected to ``addr``) once the Sentinels name another primary for ``t.service``."""
    per_loop = _watches.setdefault(asyncio.get_running_loop(), {})
    key = (t.sentinels, t.service)
    watch = per_loop.get(key)
    if watch is None:
        watch = per_loop[key] = _Watch(t, timeout_s)
    watch.add(conn, addr)
