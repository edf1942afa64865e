"""Lua scripts: state changes that must be atomic in Redis, documented in one place.

Each script touches keys of one hash tag only, so it also runs on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from broker import keys


def sha(script: str) -> str:
    """The SHA1 that EVALSHA names a script by."""
    return hashlib.sha1(script.encode()).hexdigest()


# Deliver one reply bundle to a gateway, but only while that gateway is alive.
# KEYS[1] = gateway_alive(gw), KEYS[2] = reply_list(gw)
# ARGV[1] = reply list TTL in ms, ARGV[2] = the bundle
# Returns 1 when delivered, 0 when the gateway is gone (the bundle is dropped:
# nobody waits for it, and pushing would recreate a key nobody deletes).
PUSH_REPLY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Admit one request group to a model's queue, or refuse it when the queue is full.
# (The native edge does without it where it saw the queue at most half full: INCRBY and XADD
# in one MULTI/EXEC, the count checked after the fact; gateway/edge/dispatch.go, admit.)
# KEYS[1] = request_stream, KEYS[2] = queue_count (same model version: one slot)
# ARGV[1] = requests in the group, ARGV[2] = max_queue_size, ARGV[3..] = the entry's fields and values
# Returns the queue length after admitting, or -1 - (current length) when refused.
ENQUEUE = """
local queued = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = tonumber(ARGV[1])
if queued + n > tonumber(ARGV[2]) then
  return -1 - queued
end
redis.call('INCRBY', KEYS[2], n)
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return queued + n
"""

# A broker is done with some request-stream entries (every request they carried
# is batched, rejected or cancelled): acknowledge and delete them, and take their
# requests off the queue count in the same step, so the count never drifts from
# the stream.
# KEYS[1] = request_stream, KEYS[2] = queue_count
# ARGV[1] = consumer group, ARGV[2] = requests the entries carried, ARGV[3..] = entry ids
ACK_REQUESTS = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
local left = redis.call('DECRBY', KEYS[2], ARGV[2])
if left <= 0 then
  redis.call('DEL', KEYS[2])
end
return left
"""

# Remove a dead process's consumer from a group, but only if it holds no pending entry:
# XGROUP DELCONSUMER drops a consumer's pending entries with it, and the consumer may
# have read something since the caller looked (broker.reclaim).
# KEYS[1] = the stream; ARGV[1] = group, ARGV[2] = consumer
# Returns 1 when deleted, 0 when it holds entries.
DROP_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

ALL = (PUSH_REPLY, ENQUEUE, ACK_REQUESTS, DROP_CONSUMER)
PUSH_REPLY_SHA = sha(PUSH_REPLY)
ACK_REQUESTS_SHA = sha(ACK_REQUESTS)


def push_reply_commands(replies: Iterable[tuple[str, bytes]]) -> list[list[bytes | str | int]]:
    """One PUSH_REPLY call per gateway, carrying the bundle of its encoded replies (gateway id, reply)."""
    by_gateway: dict[str, list[bytes]] = defaultdict(list)
    for gateway, reply in replies:
        by_gateway[gateway].append(reply)
    return [
        ["EVALSHA", PUSH_REPLY_SHA, 2, keys.gateway_alive(gw), keys.reply_list(gw), keys.REPLY_TTL_MS, b"".join(bundle)]
        for gw, bundle in by_gateway.items()
    ]


def settle_entries(stream: str, ids: list[bytes]) -> list[list[bytes | str | int]]:
    """Take finished (or moved) batch entries off a pool stream: delete, then acknowledge. In that
    order because a failover can keep the first of the two writes and lose the second (asynchronous
    replication): a deleted entry still pending is cleaned up by the next claim (XCLAIM drops it
    from the pending list); an acknowledged entry still in the stream would be delivered to nobody
    and stay forever. Workers settle what they ran; the broker what it moved off a dead pool."""
    return [["XDEL", stream, *ids], ["XACK", stream, keys.WORKER_GROUP, *ids]]


async def load_all(client: Any) -> None:
    """SCRIPT LOAD every script (again after a Redis restart answered NOSCRIPT)."""
    for script in ALL:
        await client.call("SCRIPT", "LOAD", script)
