"""Taking over stream entries whose consumer died: the at-least-once half of delivery.

Brokers read request streams and workers read pool streams through consumer
groups, so an entry read by a process that then dies stays in the group's
pending list (PEL) under that process's consumer name.  Each live process
of the same role periodically looks for pending entries whose consumer is
not registered as alive (``keys.WORKERS`` for workers, ``keys.BROKERS`` for
brokers: heartbeat expiry within ``keys.HEARTBEAT_TTL_MS``) and has been
idle at least ``min_idle_ms``, and claims them with XCLAIM, which is atomic:
when two processes race for an entry, one gets it.

Claiming by liveness rather than idle time alone means a live process that
is merely slow (a long batch) never has its work taken and run twice; the
cost is that a hung but heartbeating process keeps its entries (a worker
computing on its event loop stops heartbeating when it hangs, so it does
not hang on to them).

XPENDING reports how many times each entry has been delivered; the caller
decides what a repeated delivery means (workers split and dead-letter
batches that keep killing their worker: ``workers.recovery``).

A live process can also own entries it no longer knows about: Redis lost
writes (a Sentinel failover, a restart from an AOF that missed its last
fsync) and brought back an entry the process had already acknowledged, or
that it read on the old primary.  Nobody else would ever claim those, so
``claim_forgotten`` has each process take back, from its own pending list,
entries idle ``FORGOTTEN_IDLE_MS`` that it does not hold: they run again
(at least once), and the gateway keeps the first answer.

Consumers of dead processes would otherwise stay in the group forever, one
per restart; ``forget_dead_consumers`` removes those that hold nothing
(scripts.DROP_CONSUMER checks that atomically).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from broker import scripts
from ferry.resp import DataClient, range_entries

CLAIM_COUNT = 256  # pending entries looked at per stream and pass
RECLAIM_S = 1.0  # how often live processes look for orphans
# An orphan must also be this idle: a process that just started reading may not have
# registered yet.
ORPHAN_IDLE_MS = 1000
FORGET_EVERY = 30  # passes between sweeps of dead consumers
FORGOTTEN_IDLE_MS = 5000


@dataclass(slots=True)
class Claimed:
    entry_id: bytes
    deliveries: int  # deliveries before this claim (each ended with its consumer dead)
    fields: dict[bytes, bytes]


async def live_members(client: DataClient, registry: str) -> set[bytes]:
    """Ids whose heartbeat has not expired in a registry ZSET (score = expiry, ms)."""
    now_ms = int(time.time() * 1000)
    return set(await client.call("ZRANGEBYSCORE", registry, now_ms, "+inf"))


async def claim_orphans(client: DataClient, stream: str, group: str, consumer: str, live: set[bytes],
                        min_idle_ms: int) -> list[Claimed]:
    """Claim for ``consumer`` the pending entries of ``stream`` whose consumer is not in ``live``."""
    pending = await client.call("XPENDING", stream, group, "IDLE", min_idle_ms, "-", "+", CLAIM_COUNT)
    orphans = {entry_id: int(deliveries) for entry_id, owner, _idle, deliveries in pending or ()
               if owner not in live}
    return await _claim(client, stream, group, consumer, min_idle_ms, orphans)


async def claim_forgotten(client: DataClient, stream: str, group: str, consumer: str, held: set[bytes],
                          min_idle_ms: int = FORGOTTEN_IDLE_MS) -> list[Claimed]:
    """Take back ``consumer``'s own pending entries of ``stream`` that are not in ``held``."""
    pending = await client.call("XPENDING", stream, group, "IDLE", min_idle_ms, "-", "+", CLAIM_COUNT, consumer)
    lost = {entry_id: int(deliveries) for entry_id, _owner, _idle, deliveries in pending or ()
            if entry_id not in held}
    return await _claim(client, stream, group, consumer, min_idle_ms, lost)


async def _claim(client: DataClient, stream: str, group: str, consumer: str, min_idle_ms: int,
                 wanted: dict[bytes, int]) -> list[Claimed]:
    """XCLAIM ``wanted`` (entry id: deliveries so far); atomic, so of two claimants one wins."""
    if not wanted:
        return []
    reply = await client.call("XCLAIM", stream, group, consumer, min_idle_ms, *wanted)
    # An entry deleted while pending comes back as nil (or not at all) and leaves the PEL.
    return [Claimed(entry_id, wanted[entry_id], fields)
            for entry_id, fields in range_entries([e for e in reply or () if e is not None])
            if entry_id in wanted]


async def forget_dead_consumers(client: DataClient, stream: str, group: str, live: set[bytes],
                                min_idle_ms: int) -> int:
    """Delete the group's consumers that are not alive, idle ``min_idle_ms`` and hold no entries."""
    dropped = 0
    for info in await client.call("XINFO", "CONSUMERS", stream, group) or ():
        fields = _pairs(info)
        name = fields[b"name"]
        if name in live or int(fields[b"pending"]) or int(fields[b"idle"]) < min_idle_ms:
            continue
        dropped += int(await client.call("EVALSHA", scripts.sha(scripts.DROP_CONSUMER), 1, stream, group, name))
    return dropped


def _pairs(flat: Any) -> dict[bytes, Any]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))
