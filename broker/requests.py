"""What the broker holds for each request it read and each request-stream entry it came in.

A request-stream entry carries a group of requests (broker.messages); broker.served turns it into
one ``Entry`` and a ``Request`` per request, the scheduler (broker.scheduler) queues the requests,
and the entry is acknowledged once every one of them has left the queue (broker.handoff.Settling).
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.errors import Code

# A request's state: waiting in the scheduler, taken into a batch, or dropped (cancelled, rejected).
QUEUED, TAKEN, DROPPED = 0, 1, 2


@dataclass(slots=True, eq=False)
class Entry:
    """One request-stream entry: acknowledged once every request it carried has left the queue."""

    entry_id: bytes
    count: int  # requests it carried (what the model's queue counter holds for it)
    remaining: int  # of them not yet handled
    # Unconfirmed writes that handled some of them, and how many of those are a colocated worker's
    # replies (broker.handoff.Settling); whether its acknowledgement is written or on its way.
    settling: int = 0
    settling_replies: int = 0
    acked: bool = False


@dataclass(slots=True, eq=False)
class Request:
    entry: Entry
    gateway: str
    corr: int
    rows: int
    enqueued_ns: int  # wall clock, set by the gateway
    arrived: float  # monotonic, when the broker read it
    deadline: float  # monotonic; math.inf for none
    timeout_at: float  # monotonic end of its queue timeout; math.inf for none
    level: int  # 0 = highest priority
    shape: str
    payload: bytes = b""
    state: int = QUEUED
    delayed: bool = False
    doomed: float = 0.0  # > 0: the queue ahead needs this long, past its deadline: reject at once
    token: int = 0  # changes whenever it is (re)placed: older copies in deques and heaps are stale
    trace: str = ""  # W3C traceparent of its request span ('' = not traced)
    taken_over: bool = False  # claimed from a dead broker or taken back: never handed in-process


@dataclass(slots=True)
class Rejection:
    request: Request
    message: str
    code: int = Code.DEADLINE_EXCEEDED
