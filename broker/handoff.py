"""Batches a broker hands to the worker in its own process (``ferry broker --colocated-worker``).

A batch for a pool stream costs a Redis round trip for the broker (XADD), one for
the worker (XREADGROUP), the tensor bytes copied into and out of Redis once more,
and a done notice through pub/sub.  When the broker runs the pool's worker itself,
it hands the batch over on an in-process queue instead, and the worker's reply
pipeline settles the batch's request entries: one round trip a batch in all, not
three (docs/architecture.md, "Colocation", has the measurements).

What changes against the pool-stream path (broker.keys, broker.messages):

* No batch entry and no done notice.  The batch's requests stay pending in their
  request stream, under the broker's consumer, until their replies are written.
  If the process dies before that, another broker (or the next one started)
  claims them (broker.reclaim) and they run again: at least once, as on the
  stream path.
* Requests a broker took over from a dead broker, or took back from its own
  pending list, never take this path: they go through the pool stream, where
  workers.recovery counts the worker deaths a batch was running in and
  dead-letters one that keeps killing them.  Otherwise a request that crashes
  the process would crash every restart.
* A handed batch takes room in its pool like any other (``Pool.unfinished``, under
  an id starting with ``HANDED``, never a stream id), up to ``pool_depth`` at a
  time; beyond that, and for every other pool, batches go to the pool stream.

Acknowledging request entries (scripts.ACK_REQUESTS) is what makes a request
"handled" for good, so it must never reach Redis ahead of a write that handled
one of the entry's requests: a batch on a pool stream, a rejection's reply, a
handed batch's replies.  Writes on one connection reach Redis in order, but the
broker's rounds and its worker's replies travel on two, and Redis may run those
in either order.  ``Settling`` keeps the rule: a write may carry the
acknowledgement of an entry it completes if no write *on the other connection*
that handled part of the entry is still unconfirmed; otherwise the entry waits
until the last of those is confirmed, and the next write acknowledges it.  (An
entry split over two handed batches, the common case, is acknowledged by the
second batch's replies; one split between a broker round and a handed batch
waits.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from broker.messages import Member
from broker.requests import Entry, Request

HANDED = b"handed-"  # prefix of a handed batch's id in Pool.unfinished


def is_handed(batch_id: bytes) -> bool:
    return batch_id.startswith(HANDED)


class Acks(Protocol):
    """Where a model version's settled entries wait for acknowledgement (the broker's per-model state)."""

    stream: str
    counter: str
    done: list[Entry]
    held: set[bytes]


@dataclass(eq=False)
class Settling:
    """The request entries one write handles requests of: a broker round, or (``replies``) a handed
    batch's replies on its worker's connection."""

    replies: bool = False
    touched: dict[Entry, Acks] = field(default_factory=dict)
    ready: list[tuple[Acks, Entry]] = field(default_factory=list)  # acknowledged by this write
    waiting: list[tuple[Acks, Entry]] = field(default_factory=list)  # by a later one

    def settle(self, acks: Acks, req: Request) -> None:
        """``req`` is handled by this write."""
        req.entry.remaining -= 1
        self.touched[req.entry] = acks

    def unsettle(self, req: Request) -> None:
        """This write failed; ``req`` goes back to its queue."""
        req.entry.remaining += 1
        req.entry.acked = False

    def seal(self) -> None:
        """The write is built: decide which entries it acknowledges."""
        for entry, acks in self.touched.items():
            other = entry.settling - entry.settling_replies if self.replies else entry.settling_replies
            if entry.remaining == 0 and other == 0 and not entry.acked:
                entry.acked = True
                self.ready.append((acks, entry))
            else:
                entry.settling += 1
                entry.settling_replies += self.replies
                self.waiting.append((acks, entry))
        self.touched.clear()

    def finish(self) -> list[tuple[Acks, Entry]]:
        """The write is confirmed, or failed and was undone: the waiting entries that no unconfirmed
        write touches any more and whose requests are all handled, to acknowledge next."""
        out = []
        for acks, entry in self.waiting:
            entry.settling -= 1
            entry.settling_replies -= self.replies
            if entry.remaining == 0 and entry.settling == 0 and not entry.acked:
                entry.acked = True
                out.append((acks, entry))
        self.waiting.clear()
        return out


def ack_commands(entries: list[tuple[Acks, Entry]], group: str, sha: str) -> list[list[bytes | str | int]]:
    """scripts.ACK_REQUESTS for ``entries``, one call per model version."""
    by_model: dict[int, tuple[Acks, list[Entry]]] = {}
    for acks, entry in entries:
        by_model.setdefault(id(acks), (acks, []))[1].append(entry)
    return [["EVALSHA", sha, 2, acks.stream, acks.counter, group, sum(e.count for e in es),
             *(e.entry_id for e in es)] for acks, es in by_model.values()]


@dataclass(eq=False)
class HandedBatch:
    batch_id: bytes
    model: str
    version: int
    members: list[Member]
    trace: str  # the broker's batch span ('' = not traced)
    requests: list[Request]  # the broker's own records of the members, in the same order
    replied_ns: int = 0  # wall clock just before its replies were sent (callers answered after it)


@dataclass(eq=False)
class Settled:
    """What the worker's reply pipeline for a handed batch (or a follow-up) must carry, and then report."""

    commands: list[list[bytes | str | int]]
    settling: Settling
    acked: list[tuple[Acks, Entry]]


class Handoff:
    """The queue between a broker and the worker in its process, and the calls each side makes.

    The broker ``hand``s batches while ``has_room``; the worker ``take``s one, runs it, puts
    ``finish``'s commands after its replies in one pipeline, reports that it ``ran`` once the
    pipeline is on the socket, and once Redis confirmed that pipeline reports ``confirmed``
    (which may return a follow-up to send the same way).
    """

    def __init__(self, pool: str, depth: int) -> None:
        self.pool = pool
        self.depth = depth
        self._queue: asyncio.Queue[HandedBatch] = asyncio.Queue()
        self.running = 0  # handed and not yet finished
        self._idle = asyncio.Event()
        self._idle.set()
        self._finish: Callable[[HandedBatch], Settled] | None = None
        self._ran: Callable[[HandedBatch, int, int], None] | None = None
        self._confirmed: Callable[[Settled], Settled | None] | None = None
        self._lost: Callable[[Settled], None] | None = None
        self._closed = False

    def attach(self, finish: Callable[[HandedBatch], Settled], ran: Callable[[HandedBatch, int, int], None],
               confirmed: Callable[[Settled], Settled | None], lost: Callable[[Settled], None]) -> None:
        """The broker's side: how a finished batch is settled, and what its run teaches."""
        self._finish, self._ran, self._confirmed, self._lost = finish, ran, confirmed, lost

    def has_room(self) -> bool:
        return self._finish is not None and not self._closed and self.running < self.depth

    def close(self) -> None:
        """The worker stopped taking batches (it failed): the broker's go to the pool stream again."""
        self._closed = True

    def hand(self, batch: HandedBatch) -> None:
        self.running += 1
        self._idle.clear()
        self._queue.put_nowait(batch)

    def waiting(self) -> bool:
        """Batches handed over that the worker has not taken yet."""
        return not self._queue.empty()

    async def take(self) -> HandedBatch:
        return await self._queue.get()

    def finish(self, batch: HandedBatch) -> Settled:
        """The worker ran ``batch`` and is about to send its replies: what the pipeline must carry."""
        assert self._finish is not None
        self.running -= 1
        if self.running == 0:
            self._idle.set()
        return self._finish(batch)

    def ran(self, batch: HandedBatch, rows: int, compute_ns: int) -> None:
        """The replies of ``batch`` (``rows`` computed, 0 if nothing ran) are on their way: room in
        the pool, and the latency the broker learns.  Kept apart from ``finish`` so that this
        bookkeeping runs after the replies leave, not on the client's time."""
        assert self._ran is not None
        self._ran(batch, rows, compute_ns)

    def confirmed(self, settled: Settled) -> Settled | None:
        assert self._confirmed is not None
        return self._confirmed(settled)

    def lost(self, settled: Settled) -> None:
        """The worker gave up writing ``settled`` (a bug): its requests must run again."""
        assert self._lost is not None
        self._lost(settled)

    async def drained(self) -> None:
        """Until every handed batch is finished."""
        await self._idle.wait()

