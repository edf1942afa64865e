"""Every Redis key Ferry uses, and what lives under it.

Key layout (``{...}`` is a Redis Cluster hash tag: all keys of one model, one
pool or one gateway hash to one slot, so multi-key commands on them work on
a cluster too)::

    ferry:{m:<model>}:v<version>:requests   STREAM  requests waiting for the broker.
                                            Group ``brokers``. Entries are XDELed
                                            once their batch is on a pool stream (or,
                                            handed to a broker's own worker in-process,
                                            once its replies are written: broker.handoff).
    ferry:{m:<model>}:v<version>:queued     STRING  requests in request-stream entries not yet
                                            acknowledged by a broker: the queue that
                                            max_queue_size bounds.  Changed only by
                                            scripts.ENQUEUE, scripts.ACK_REQUESTS and
                                            the edge's MULTI/EXEC of INCRBY and XADD
                                            (gateway/edge/dispatch.go, admit);
                                            deleted when it drops to 0.
    ferry:{m:<model>}:v<version>:stats      HASH    cumulative statistics served by
                                            ModelStatistics (see broker.messages.Stat).
    ferry:{p:<pool>}:batches                STREAM  batches waiting for a worker of the
                                            pool. Group ``workers``. Entries are
                                            XDELed once every member has its reply,
                                            so XLEN is the pool's backlog (pending +
                                            undelivered) and KEDA can scale on it.
    ferry:{p:<pool>}:dead                   STREAM  dead letters: batch entries (one request
                                            each) that were running every time a worker
                                            died, N times (workers.recovery), with the
                                            reason; capped at DEAD_LETTER_MAXLEN entries.
    ferry:{p:<pool>}:wake                   LIST    one element while a model needs the pool and it
                                            has no live worker: what an autoscaler wakes a
                                            pool scaled to zero on (the Helm chart's KEDA
                                            trigger). Set by brokers with a TTL, deleted by
                                            the pool's workers' heartbeats.
    ferry:{g:<gateway>}:replies             LIST    reply bundles for the calls one gateway
                                            holds, pushed by workers only while the
                                            gateway is alive (broker.scripts.PUSH_REPLY)
                                            and popped in bulk by the gateway.
    ferry:{g:<gateway>}:alive               STRING  the gateway's heartbeat (TTL). Deleted
                                            on a clean stop, so no reply can recreate
                                            the list of a gateway that is gone.
    ferry:workers                           ZSET    live workers: member = worker id,
                                            score = heartbeat expiry (ms since epoch).
                                            Expired members are pruned by every
                                            heartbeat and every registry read.
    ferry:brokers                           ZSET    live brokers, as ferry:workers: a broker's
                                            unacknowledged request entries are claimed
                                            by another once it is gone (broker.reclaim).
    ferry:worker:<id>                       STRING  the worker's registration (pool, runtime,
                                            devices, models, latency profile:
                                            broker.messages, item 6), same TTL.

Pub/sub channel (not a key): ``ferry:{p:<pool>}:done``, where workers announce
finished batches to brokers (broker.messages, item 5).

No key is created per request: a request lives as one stream entry, then as
part of one batch entry, then as one list element, each deleted on use.
"""

from __future__ import annotations

PREFIX = "ferry"
BROKER_GROUP = "brokers"
WORKER_GROUP = "workers"
WORKERS = f"{PREFIX}:workers"
BROKERS = f"{PREFIX}:brokers"
DEAD_LETTER_MAXLEN = 1000
WAKE_TTL_MS = 60_000  # a wake-up signal outlives the demand that raised it by this much

# How long an unread reply list outlives its last push: long enough to ride out a
# gateway's Redis reconnect, short enough that a dead gateway leaves nothing behind.
REPLY_TTL_MS = 60_000
# Workers refresh their registration this often; it expires after three misses.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_MS = 3_000
# A gateway's alive key lives longer: while it is missing, replies to that gateway are
# dropped, so a gap between heartbeats (a Sentinel failover takes a second or two, and
# the new primary has the key as it was when it was promoted) must not expire it.  A dead
# gateway's replies are then pushed for up to this long before they stop.
GATEWAY_ALIVE_TTL_MS = 15_000


def request_stream(model: str, version: int) -> str:
    return f"{PREFIX}:{{m:{model}}}:v{version}:requests"


def queue_count(model: str, version: int) -> str:
    return f"{PREFIX}:{{m:{model}}}:v{version}:queued"


def done_channel(pool: str) -> str:
    return f"{PREFIX}:{{p:{pool}}}:done"


def stats_hash(model: str, version: int) -> str:
    return f"{PREFIX}:{{m:{model}}}:v{version}:stats"


def pool_stream(pool: str) -> str:
    return f"{PREFIX}:{{p:{pool}}}:batches"


def dead_letters(pool: str) -> str:
    return f"{PREFIX}:{{p:{pool}}}:dead"


def wake_list(pool: str) -> str:
    return f"{PREFIX}:{{p:{pool}}}:wake"


def reply_list(gateway_id: str) -> str:
    return f"{PREFIX}:{{g:{gateway_id}}}:replies"


def gateway_alive(gateway_id: str) -> str:
    return f"{PREFIX}:{{g:{gateway_id}}}:alive"


def worker_info(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"
