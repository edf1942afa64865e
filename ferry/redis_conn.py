"""Redis clients with bounded waits, and the mapping of Redis failures to UNAVAILABLE."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from ferry.errors import Unavailable
from ferry.redis_url import parse as parse_url
from ferry.redis_url import redact

# Errors that mean "Redis is not reachable right now" rather than a bug.
REDIS_DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError)


def connect(url: str, timeout_s: float, *, max_connections: int = 64) -> Any:
    """A redis-py client (setup, heartbeats, statistics) whose every call ends within ``timeout_s``.

    The data path uses ferry.resp instead; blocking reads live there too.
    """
    t = parse_url(url)
    # No CLIENT SETINFO on connect: not a command the least-privilege ACL users (broker.acl) may run.
    quiet: dict[str, Any] = {"lib_name": None, "lib_version": None}
    if t.cluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in t.sentinels], username=t.username, password=t.password,
            socket_connect_timeout=timeout_s, socket_timeout=timeout_s, max_connections=max_connections,
            decode_responses=False, **quiet)
    if t.sentinel:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(t.sentinels), sentinel_kwargs={"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s})
        return sentinel.master_for(
            t.service, db=t.db, username=t.username, password=t.password, socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s, max_connections=max_connections, decode_responses=False, **quiet)
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        max_connections=max_connections,
        decode_responses=False,
        **quiet,
    )


def unavailable(url: str, exc: BaseException) -> Unavailable:
    # Never echo credentials that may be embedded in the URL.
    where = redact(url)
    return Unavailable(f"Redis at {where} is unreachable ({type(exc).__name__}: {exc}); retry later")


async def ensure_group(redis: Any, stream: str, group: str) -> None:
    """Create a consumer group (and its stream) if missing; starting at id 0 skips nothing queued before it."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except rexc.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
