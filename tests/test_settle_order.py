"""A failover may keep the first of a worker's two closing writes and lose the second: either way
nothing must stay behind. Real Redis, real claim path (broker.reclaim)."""

from __future__ import annotations

import asyncio

import pytest

from broker import keys
from broker.reclaim import claim_forgotten
from broker.scripts import settle_entries
from ferry.cluster import start_redis
from ferry.resp import RespClient


@pytest.mark.parametrize("kept", [0, 1, 2], ids=["both-lost", "first-kept", "both-kept"])
def test_a_batch_entry_settles_whichever_prefix_of_its_writes_survives(kept: int) -> None:
    server = start_redis()

    async def run() -> tuple[int, int]:
        r = RespClient(server.url, 2.0)
        stream = keys.pool_stream("cpu")
        await r.call("XGROUP", "CREATE", stream, keys.WORKER_GROUP, "0", "MKSTREAM")
        entry = await r.call("XADD", stream, "*", "b", "batch")
        await r.call("XREADGROUP", "GROUP", keys.WORKER_GROUP, "w1", "COUNT", 1, "STREAMS", stream, ">")
        closing = settle_entries(stream, [entry])
        if kept:
            await r.execute(closing[:kept])
        # The worker no longer holds it (it finished): its forgotten-entry pass takes back what is left.
        for claimed in await claim_forgotten(r, stream, keys.WORKER_GROUP, "w1", held=set(), min_idle_ms=0):
            await r.execute(settle_entries(stream, [claimed.entry_id]))  # ran again, settled again
        summary = await r.call("XPENDING", stream, keys.WORKER_GROUP)
        length = await r.call("XLEN", stream)
        await r.close()
        return int(length), int(summary[0])

    try:
        assert asyncio.run(run()) == (0, 0)
    finally:
        server.stop()
