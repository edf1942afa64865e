"""What the broker knows about each worker pool, and which pool gets a batch.

A pool is a Redis stream (``ferry:{p:<pool>}:batches``, one consumer group)
and the live workers that read it.  The broker remembers every batch it put on
a pool's stream until the pool's done notice for it arrives, with when it went
out and how long it should compute, so it knows the pool's backlog and when
each worker will be free (``free_at``).

Routing (``route``): a model's config lists the pools it may run on, each with
a cost per worker-hour (``ferry.pools``).  A batch goes to the cheapest pool
that has a live worker, has room for one more batch (``pool_depth`` per live
worker) and can start it before its most urgent member has to go; a pool that
is full or too slow is passed over for the next one (spill-over).  A pool with
no live worker never gets a batch.  When no pool qualifies the requests wait in
the broker, where they keep growing into bigger batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from broker.handoff import is_handed
from broker.latency import LatencyModel, smooth, worker_free_at

EARLY_MEMORY_S = 10.0  # done notices for entries not (yet) known here are remembered this long


@dataclass(eq=False)
class Pool:
    name: str
    stream: str
    # entry id -> (dispatch time, rows, expected compute seconds, expected start, model key), in dispatch order
    unfinished: dict[bytes, tuple[float, int, float, float, bytes]] = field(default_factory=dict)
    early: dict[bytes, float] = field(default_factory=dict)  # done before its XADD reply came
    checked: float = 0.0  # when the unfinished entries were last checked
    missing: set[bytes] = field(default_factory=set)  # unfinished, yet gone from the stream at the last check
    # Dispatch-to-done time beyond compute and waiting for a worker: the Redis hops and the
    # worker's own reading and replying.  An adaptive batch leaves this much before a worker frees.
    hop: float = 0.0
    woke_at: float = -math.inf  # when this broker last raised the pool's wake-up signal

    def dispatched(self, entry_id: bytes, at: float, rows: int, compute: float, workers: int,
                   model: bytes) -> None:
        if self.early.pop(entry_id, None) is None:
            start = max(at, self.free_at(workers, at, []))
            self.unfinished[entry_id] = (at, rows, compute, start, model)

    def free_at(self, workers: int, now: float, formed: Sequence[float]) -> float:
        """When a worker is expected to be free for one more batch; ``formed``: the expected
        compute of batches formed this round and not yet sent."""
        return worker_free_at([(u[0], u[2]) for u in self.unfinished.values()], workers, now, list(formed))

    def on_stream(self) -> list[bytes]:
        """Its unfinished batches that are pool-stream entries: not those handed to a worker in-process
        (broker.handoff), which no done notice announces and no XRANGE finds."""
        return [b for b in self.unfinished if not is_handed(b)]

    @property
    def rows_ahead(self) -> int:
        """Rows this broker handed to the pool that are not finished: queued work a new request waits behind."""
        return sum(u[1] for u in self.unfinished.values())

    def finished(self, entry_id: bytes, at: float) -> tuple[float, float] | None:
        """The entry's dispatch time and expected start, if this broker dispatched it and is still
        waiting for it."""
        sent = self.unfinished.pop(entry_id, None)
        self.missing.discard(entry_id)
        if sent is None:
            self.early[entry_id] = at
            if len(self.early) > 1000:
                self.early = {k: t for k, t in self.early.items() if at - t < EARLY_MEMORY_S}
            return None
        return sent[0], sent[3]

    def lost(self, entry_id: bytes) -> bool:
        """A check found this unfinished entry gone from the stream: is its done notice lost?

        Not at the first sighting: a worker deletes the entry and publishes the notice in one
        pipeline, so the notice can still be on its way (or unread on the subscription) while the
        broker's check runs. Gone at two checks in a row (RESYNC_S apart) with no notice in between:
        lost, and the batch is counted as finished so its room is not held forever."""
        if entry_id not in self.missing:
            self.missing.add(entry_id)
            return False
        self.missing.discard(entry_id)
        self.unfinished.pop(entry_id, None)
        return True

    def observe_hop(self, hop: float) -> None:
        self.hop = hop if self.hop == 0 else smooth(self.hop, hop)


@dataclass
class Choice:
    pool: Pool
    latency: LatencyModel
    release_at: float  # when an adaptive batch for it should leave (-inf: at once)


def route(
    options: Sequence[tuple[Pool, LatencyModel]],
    *,
    workers: Callable[[str], int],
    room: Callable[[Pool], float],
    formed: Callable[[Pool], Sequence[float]],
    now: float,
    urgent: float | None,
) -> Choice | None:
    """The pool for a model's next batch, from its ``options`` (cheapest first), or None.

    ``urgent``: the moment by which the model's most urgent request must be on
    its way (None: no deadline presses).  A pool whose worker frees up later
    than that is passed over while a later option can do better.
    """
    late: Choice | None = None
    for pool, latency in options:
        n = workers(pool.name)
        if n <= 0 or room(pool) <= 0:
            continue
        release = pool.free_at(n, now, formed(pool)) - pool.hop
        choice = Choice(pool, latency, release)
        if urgent is None or release <= urgent:
            return choice
        # Too slow for the most urgent request: keep the one that frees up first, in case
        # no later pool does better.
        if late is None or release < late.release_at:
            late = choice
    return late


def fastest(options: Sequence[tuple[Pool, LatencyModel]], workers: Callable[[str], int]) -> LatencyModel | None:
    """The latency model of the live pool that runs one row soonest (None: no live pool).

    Deadline checks that decide whether a request can still make it use this
    one: a request is hopeless only if no live pool could serve it in time.
    """
    best: tuple[float, LatencyModel] | None = None
    for pool, latency in options:
        if workers(pool.name) > 0:
            cost = latency.expected(1)
            if best is None or cost < best[0]:
                best = (cost, latency)
    return None if best is None else best[1]


def least_loaded(options: Sequence[tuple[Pool, LatencyModel]], workers: Callable[[str], int]) -> int:
    """Rows ahead in the live pool with the fewest (0 when none is live): what a new request
    waits behind at best."""
    ahead = [pool.rows_ahead for pool, _ in options if workers(pool.name) > 0]
    return min(ahead) if ahead else 0

