"""Which model versions and pools have live workers, as seen from a gateway or broker.

Workers register in ``ferry:workers`` with a heartbeat (see broker.keys).  A
background task refreshes the gateway's view every ``REFRESH_S``, so the
check on the request path is a dictionary lookup, not a Redis round trip.

When a refresh fails (Redis restarting, a Sentinel failover) the last view
stands for up to one heartbeat TTL: the workers it lists were alive that
recently, and failing every request for a blip of a second would be worse
than the rare one sent to a worker that just died (its batch is reclaimed).
The registry is read through ferry.resp, which connects only to a primary,
so a failover cannot serve an empty registry from a replica that is still
resynchronising.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from broker import keys
from broker.messages import WorkerInfo
from ferry.errors import FerryError, Unavailable
from ferry.lifecycle import cancel_all
from ferry.redis_conn import REDIS_DOWN, unavailable
from ferry.repository import ModelVersion
from ferry.resp import DataClient

log = logging.getLogger("ferry.liveness")

REFRESH_S = 0.5


class LiveWorkers:
    def __init__(self, redis: DataClient, redis_url: str, grace_s: float = 2.0) -> None:
        self._redis = redis
        self.grace_s = grace_s
        self._url = redis_url
        # Called with each new view before calls can see it, so that anything derived
        # from it (the gRPC health status) is never behind ServerReady.
        self.on_refresh: Callable[[Counter[tuple[str, int]]], Awaitable[None]] | None = None
        self._served: Counter[tuple[str, int]] = Counter()
        self.pools: Counter[str] = Counter()  # live workers per pool
        self._error: FerryError | None = Unavailable("the worker registry has not been read yet")
        self._read_at = -math.inf  # monotonic time of the last successful read
        # model version without a live worker -> (first, last) request asking for it meanwhile
        self._asked: dict[tuple[str, int], tuple[float, float]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="live-workers")

    async def close(self) -> None:
        if self._task:
            await cancel_all([self._task])

    async def refresh(self) -> None:
        now_ms = int(time.time() * 1000)
        try:
            # Dead workers' entries go here too, not only in live workers' heartbeats: the
            # registry must not keep the last worker of a cluster forever.
            _, ids = await self._redis.execute([["ZREMRANGEBYSCORE", keys.WORKERS, "-inf", now_ms],
                                                ["ZRANGEBYSCORE", keys.WORKERS, now_ms, "+inf"]])
            # GETs, not one MGET: on a Redis Cluster the registrations live in different slots.
            infos = await self._redis.execute([["GET", keys.worker_info(i.decode())] for i in ids]) if ids else []
        except REDIS_DOWN as exc:
            if time.monotonic() - self._read_at < keys.HEARTBEAT_TTL_MS / 1000:
                log.warning("worker registry unreadable (%s); keeping the last view", exc)
                return
            self._error = unavailable(self._url, exc)
            if self.on_refresh is not None:
                await self.on_refresh(Counter())
            return
        self._read_at = time.monotonic()
        served: Counter[tuple[str, int]] = Counter()
        pools: Counter[str] = Counter()
        for raw in infos:
            if raw is not None:
                info = WorkerInfo.decode(raw)
                pools[info.pool] += 1
                for key in info.models:
                    served[key] += 1
        if self.on_refresh is not None:
            await self.on_refresh(served)
        for key in served:
            self._asked.pop(key, None)
        self._served, self.pools, self._error = served, pools, None

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                # Not an outage (those are handled in refresh): log it, keep the loop alive.
                log.exception("reading the worker registry failed")
            await asyncio.sleep(REFRESH_S)

    def workers_for(self, mv: ModelVersion) -> int:
        """Live workers serving ``mv`` (0 when the registry cannot be read)."""
        return 0 if self._error else self._served[mv.key]

    def require(self, mv: ModelVersion) -> None:
        """Raise UNAVAILABLE unless ``mv`` has a live worker, or requests for it have been waiting
        for one less than ``grace_s`` (a worker restarting, workers re-registering after a Redis
        failover, a pool scaling up from zero: the broker holds the requests meanwhile)."""
        if self._error:
            raise self._error
        if self._served[mv.key]:
            return
        now = time.monotonic()
        first, last = self._asked.get(mv.key, (now, now))
        if now - last > self.grace_s:
            first = now  # nobody asked for a while: a new wait begins
        self._asked[mv.key] = (first, now)
        if now - first > self.grace_s:
            pools = mv.settings.pool_names
            raise Unavailable(
                f"model {mv.name!r} v{mv.version} has had no live worker for {now - first:.1f}s (pools: "
                f"{', '.join(pools)}); start one with `ferry worker --pool {pools[0]}`, or raise "
                "no_worker_grace_s for pools that scale from zero"
            )
