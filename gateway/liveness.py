"""Which model versions have a live worker, as seen from a gateway.

Workers register in ``ferry:workers`` with a heartbeat (see broker.keys).  The
gateway keeps a view at most ``MAX_AGE_S`` old, refreshed by whichever call
needs it first (one refresh in flight at a time), so readiness checks cost a
Redis round trip a few times a second, not per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from broker import keys
from ferry.errors import Unavailable
from ferry.redis_conn import REDIS_DOWN, unavailable
from ferry.repository import ModelVersion

MAX_AGE_S = 0.5


class LiveWorkers:
    def __init__(self, redis: Any, redis_url: str) -> None:
        self._redis = redis
        self._url = redis_url
        self._served: Counter[tuple[str, int]] = Counter()
        self._pools: Counter[str] = Counter()
        self._at = -1.0
        self._refreshing: asyncio.Future[None] | None = None

    async def _refresh(self) -> None:
        now_ms = int(time.time() * 1000)
        ids = await self._redis.zrangebyscore(keys.WORKERS, now_ms, "+inf")
        infos = await self._redis.mget([keys.worker_info(i.decode()) for i in ids]) if ids else []
        served: Counter[tuple[str, int]] = Counter()
        pools: Counter[str] = Counter()
        for raw in infos:
            if raw is None:
                continue
            info = json.loads(raw)
            pools[info["pool"]] += 1
            for name, version in info["models"]:
                served[(name, int(version))] += 1
        self._served, self._pools, self._at = served, pools, time.monotonic()

    async def fresh(self) -> None:
        if time.monotonic() - self._at < MAX_AGE_S:
            return
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(lambda _: setattr(self, "_refreshing", None))
        try:
            await asyncio.shield(self._refreshing)
        except REDIS_DOWN as exc:
            raise unavailable(self._url, exc) from None

    async def workers_for(self, mv: ModelVersion) -> int:
        await self.fresh()
        return self._served[mv.key]

    async def require(self, mv: ModelVersion) -> None:
        if await self.workers_for(mv) == 0:
            pool = mv.settings.pool
            raise Unavailable(
                f"model {mv.name!r} v{mv.version} has no live worker (pool {pool!r}); "
                f"start one with `ferry worker --pool {pool}`"
            )
