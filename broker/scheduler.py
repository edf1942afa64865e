"""Batch formation for one model version: a pure, clock-injected scheduler.

The broker feeds it requests and asks it for one batch whenever the model's
pool has room for another (see broker.dispatch); everything here is plain
data structures on an injected monotonic clock, so the rules below are
property-tested without Redis or a real clock (tests/test_scheduler.py).

Order.  Requests wait in one FIFO per priority level (level 0 here is
Triton's level 1, the highest), each with a second FIFO for requests that
outlived their queue timeout under ``timeout_action: DELAY``: a level's
delayed requests go after its punctual ones but before the next level's, as
in Triton.  A batch starts from the head of the highest non-empty level and
fills, in the same order, with requests of the same *shape key* (requests
whose tensors cannot be concatenated never share a batch), so order is FIFO
within a level and shape.

Anti-starvation.  Each time a batch starts from a higher level, every
non-empty lower level that got nothing into it counts one skip (one that
did is back at zero); a level with ``starvation_limit``
skips starts the next batch.  So a level with waiting requests is passed
over at most ``starvation_limit + levels - 1`` batches in a row.

Deadlines.  Every request carries the latest moment its answer is still
useful (the client's deadline).  A request joins a batch only if the batch,
by the learned latency model, finishes before the deadline of every member;
a request that could not finish even alone is rejected as soon as that is
true (``expire``), not when its deadline passes.  A queue timeout (Triton's
queue policy) rejects or delays a request that waited too long.

When.  ``adaptive`` (window None) follows the load.  Below ``GATHER_ARRIVALS``
expected arrivals per ``gather_s``, a batch goes out just in time for a
worker: the broker knows what it handed the pool and how long each batch
should compute, so a partial batch leaves at once while a worker is idle and
otherwise gathers until the first one is expected to be free, less the hop to
reach it (``hold_for``) -- a wait that costs nobody anything.  Under load it is
the gather window, as a fixed window: holding for a busy worker on top left
the worker's stream empty when it freed up.  Without ``just_in_time`` it is the
gather window at any rate while the gateways hold more calls than are queued
(each group says how many its gateway holds): where the broker, gateway and
workers share one CPU core an idle worker is no sign of a free core, and each
early one-request batch costs the core a round of every process (Ferry pinned
to one core ran at about 700/s just in time and 1,000/s gathering).  A lone
call still leaves at once: nothing exists that could join it.  With
``return_wait_s`` (the broker's return_wait_us, applied only while the
broker's CPUs are saturated, broker.cpu_load, and to batches whose reply time
is known: its own worker's), after a batch's replies go out a partial batch
also waits, up to that long, for as many new requests as the batch answered --
closed-loop clients send their next call as soon as they have a reply; while
they trickle back, each one gives the rest half that long again, up to twice
it after the replies (broker.traffic) -- while that cohort and the queue
together fill at most a quarter of a batch: small cohorts then run as one
model call instead of several, and bigger ones keep two batches in turn (one
computing while the other's callers come back; holding 16 callers to one batch
of 32 lost throughput pinned to one core). Requests enqueued before the
replies left do not count as returning.
``fixed`` (window W): as Triton's dynamic batcher, a partial batch waits
until its oldest request has waited W (kept for reproducible comparisons).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from broker.latency import LatencyModel
from broker.requests import DROPPED, QUEUED, TAKEN, Rejection, Request
from broker.traffic import Traffic

# An adaptive batch waits its gather window for an idle worker only when at least this many
# more requests are expected within it: at lower rates nobody waits for nothing.
GATHER_ARRIVALS = 2.0
# A request is hopeless once it would finish within this margin of its deadline. The check time
# (deadline - expected) and the test (now + expected >= deadline) round differently in floating
# point; with no margin a request could sit queued one ulp past hopeless (a property test found it).
HOPELESS_MARGIN_S = 1e-9


Slot = tuple[int, Request]  # (token when placed, request)


def _valid(slot: Slot) -> bool:
    return slot[1].state == QUEUED and slot[1].token == slot[0]


def _tidy(q: deque[Slot]) -> None:
    while q and not _valid(q[0]):
        q.popleft()


@dataclass(slots=True)
class _Level:
    punctual: deque[Slot] = field(default_factory=deque)
    delayed: deque[Slot] = field(default_factory=deque)
    live: int = 0
    skips: int = 0

    def order(self) -> Iterator[Request]:
        for slot in itertools.chain(self.punctual, self.delayed):
            if _valid(slot):
                yield slot[1]

    def tidy(self) -> None:
        _tidy(self.punctual)
        _tidy(self.delayed)


class ModelScheduler:
    def __init__(
        self,
        label: str,
        *,
        max_batch_size: int,
        levels: int = 1,
        delay_on_timeout: bool = False,
        window_s: float | None = None,
        gather_s: float = 0.0,
        just_in_time: bool = True,
        return_wait_s: float = 0.0,
        preferred: tuple[int, ...] = (),
        static_sizes: tuple[int, ...] = (),
        starvation_limit: int = 8,
        latency: LatencyModel | None = None,
    ) -> None:
        self.label = label
        self.max_batch_size = max_batch_size
        self.delay_on_timeout = delay_on_timeout
        self.window_s = window_s
        self.gather_s = gather_s
        self.just_in_time = just_in_time
        self.traffic = Traffic(return_wait_s)
        self.static_sizes = tuple(sorted(static_sizes))
        self.cap = min(max_batch_size, self.static_sizes[-1]) if self.static_sizes else max_batch_size
        self._full_at = min(max(preferred), self.cap) if preferred else self.cap
        self.starvation_limit = starvation_limit
        self.latency = latency or LatencyModel()
        self._levels = [_Level() for _ in range(max(1, levels))]
        self._fifo: deque[Slot] = deque()  # arrival order, for the fixed window
        self._checks: list[tuple[float, int, Request]] = []  # (when to look again, token, request)
        self._index: dict[tuple[str, int], Request] = {}
        self._tokens = itertools.count()
        self.live = 0
        self.live_rows = 0

    def __len__(self) -> int:
        return self.live

    # --- arrivals, cancellations, expiry -------------------------------------------

    def add(self, req: Request, ahead_rows: int = 0) -> None:
        """Queue a request; ``ahead_rows``: rows already handed to the pool that it also waits behind."""
        req.level = min(max(req.level, 0), len(self._levels) - 1)
        self.traffic.arrive(req.arrived, req.enqueued_ns, req.rows)
        ahead = self.live_rows + ahead_rows
        # Without a deadline nothing can make it late: skip the arithmetic (most traffic has none).
        if ahead and req.deadline != math.inf and (speed := self.speed()) > 0:
            # Admission: the rows ahead of it drain at the model's speed; if that wait alone
            # makes it late, say so now rather than at its deadline.
            wait = ahead / speed
            if req.arrived + wait + self.latency.expected(req.rows) >= req.deadline:
                req.doomed = wait
        self._place(req, front=False)

    def speed(self) -> float:
        """Rows per second the pool gets through: as measured when it is saturated, and at least what
        one worker computes (below saturation the measured rate is only the arrival rate)."""
        cap = max(1, self.cap)
        one_worker = cap / self.latency.expected(cap) if self.latency.expected(cap) > 0 else 0.0
        return max(self.traffic.drain_rate, one_worker)

    def _place(self, req: Request, *, front: bool) -> None:
        req.token = next(self._tokens)
        req.state = QUEUED
        level = self._levels[req.level]
        slot = (req.token, req)
        q = level.delayed if req.delayed else level.punctual
        fifo = self._fifo
        if front:
            q.appendleft(slot)
            fifo.appendleft(slot)
        else:
            q.append(slot)
            if fifo and fifo[-1][1].arrived > req.arrived:
                # Re-placed after it was delayed: it keeps its place in arrival order, since the
                # window counts from the oldest wait (rare; a scan from the back).
                i = len(fifo) - 1
                while i > 0 and fifo[i - 1][1].arrived > req.arrived:
                    i -= 1
                fifo.insert(i, slot)
            else:
                fifo.append(slot)
        level.live += 1
        self.live += 1
        self.live_rows += req.rows
        self._index[(req.gateway, req.corr)] = req
        self._schedule_check(req)

    def _schedule_check(self, req: Request) -> None:
        # A request with neither deadline nor queue timeout never needs a look: keeping it out of
        # the heap spares a push per request and a pop or compaction later.
        if req.deadline == math.inf and (req.delayed or req.timeout_at == math.inf):
            return  # (the common case, decided before _check_time's arithmetic)
        when = self._check_time(req)
        if when != math.inf:
            heapq.heappush(self._checks, (when, req.token, req))

    def cancel(self, gateway: str, corr: int) -> Request | None:
        """Remove a queued request whose client gave up; None if it already left the queue."""
        req = self._index.get((gateway, corr))
        if req is None or req.state != QUEUED:
            return None
        self._leave(req, DROPPED)
        return req

    def drop_all(self) -> list[Request]:
        """Take every queued request out (its model lost every pool that could serve it)."""
        out = [r for r in self._index.values() if r.state == QUEUED]
        self._leave_all(out, DROPPED)
        return out

    def _check_time(self, req: Request) -> float:
        if req.doomed:
            return req.arrived
        when = req.deadline - self.latency.expected(req.rows) - HOPELESS_MARGIN_S
        return when if req.delayed else min(when, req.timeout_at)

    def _leave(self, req: Request, state: int) -> None:
        self._leave_all((req,), state)

    def _leave_all(self, reqs: Iterable[Request], state: int) -> None:
        # Queues are tidied once for all of them: a batch leaves from their heads, so one pass
        # pops every stale slot it left behind.
        touched: set[int] = set()
        for req in reqs:
            req.state = state
            self._levels[req.level].live -= 1
            touched.add(req.level)
            self.live -= 1
            self.live_rows -= req.rows
            self._index.pop((req.gateway, req.corr), None)
        for i in touched:
            self._levels[i].tidy()
        _tidy(self._fifo)
        if len(self._checks) > 4 * self.live + 256:
            self._compact()

    def _compact(self) -> None:
        """Drop stale slots (requests taken from the middle, or whose check is pending), so that
        memory follows what is queued rather than what passed through."""
        self._checks = [c for c in self._checks if c[2].state == QUEUED and c[2].token == c[1]]
        heapq.heapify(self._checks)
        self._fifo = deque(s for s in self._fifo if _valid(s))
        for lv in self._levels:
            lv.punctual = deque(s for s in lv.punctual if _valid(s))
            lv.delayed = deque(s for s in lv.delayed if _valid(s))

    def expire(self, now: float) -> list[Rejection]:
        """Reject requests that can no longer make their deadline or queue timeout; delay under DELAY."""
        out: list[Rejection] = []
        # self._checks each time, not a local alias: a _leave below may compact it into a new list.
        while self._checks and self._checks[0][0] <= now:
            _, token, req = heapq.heappop(self._checks)
            if req.state != QUEUED or req.token != token:
                continue
            need = self.latency.expected(req.rows)
            if req.doomed:
                out.append(Rejection(req, (
                    f"{self.label}: request cannot finish before its deadline: the requests queued ahead of "
                    f"it need about {req.doomed * 1000:.1f} ms ({(req.deadline - now) * 1000:.1f} ms left); "
                    "retry later or elsewhere, or add workers to this model's pool")))
                self._leave(req, DROPPED)
            elif now + need >= req.deadline - HOPELESS_MARGIN_S:
                left = max(0.0, req.deadline - now) * 1000
                out.append(Rejection(req, (
                    f"{self.label}: request cannot finish before its deadline ({left:.1f} ms left, "
                    f"a batch takes about {need * 1000:.1f} ms now); allow a longer deadline, "
                    "or add workers to this model's pool")))
                self._leave(req, DROPPED)
            elif not req.delayed and req.timeout_at <= now:
                if self.delay_on_timeout:
                    # Re-placed at the back of its level's delayed queue; the old slot goes stale.
                    self._leave(req, DROPPED)
                    req.delayed = True
                    self._place(req, front=False)
                else:
                    waited = (now - req.arrived) * 1000
                    out.append(Rejection(req, (
                        f"{self.label}: request timed out in the queue after {waited:.1f} ms "
                        "(queue policy timeout; timeout_action REJECT)")))
                    self._leave(req, DROPPED)
            else:
                self._schedule_check(req)
        return out

    def next_check(self) -> float | None:
        """Monotonic time at which ``expire`` has something to look at (None: nothing queued)."""
        return self._checks[0][0] if self.live and self._checks else None

    def window_closes(self, hold_s: float = 0.0) -> float | None:
        """When the oldest request's wait runs out: the fixed window, or an adaptive hold."""
        wait = hold_s if self.window_s is None else self.window_s
        if not self.live or wait <= 0:
            return None
        return self._fifo[0][1].arrived + wait

    # --- batch formation ------------------------------------------------------------

    def _start_level(self) -> int:
        busy = [i for i, lv in enumerate(self._levels) if lv.live]
        starving = [i for i in busy if self._levels[i].skips >= self.starvation_limit]
        return starving[0] if starving else busy[0]

    def ready(self, now: float, hold_s: float = 0.0) -> bool:
        """Whether a batch may leave now: full, or its oldest request waited the window (or ``hold_s``)."""
        if not self.live:
            return False
        wait = hold_s if self.window_s is None else self.window_s
        if wait <= 0 or self.max_batch_size == 0:
            return True
        return self.live_rows >= self._full_at or now - self._fifo[0][1].arrived >= wait

    def hold_for(self, release_at: float) -> float:
        """How long an adaptive partial batch may gather, counted from its oldest request's arrival.

        While fewer than ``GATHER_ARRIVALS`` more requests are expected within ``gather_s``: until
        ``release_at``, when a worker is expected to be free to take it (the caller knows the pool;
        -inf when one is idle), since waiting for a busy worker costs nothing.  Otherwise
        ``gather_s``, as a fixed window; without ``just_in_time`` also at lower rates, whenever the
        gateways hold more calls than are queued here (a lone call still leaves at once).  Never
        so long that the most urgent request would have to be rejected instead.  With
        ``return_wait_s``, at least until the callers of the last batch are back (or that wait is
        over), while they and the queue fill at most a quarter of a batch."""
        if self.window_s is not None or not self.live:
            return 0.0
        oldest = self._fifo[0][1].arrived
        traffic = self.traffic
        if self.gather_s > 0 and (traffic.rate * self.gather_s >= GATHER_ARRIVALS
                                  or (not self.just_in_time and traffic.more_coming(oldest, self.live))):
            # Under load, the window alone, as a fixed window: holding for a busy worker on top
            # would leave its stream empty when it frees up (no next batch ready), and near
            # saturation that idle gap cost more than the bigger batch saved.
            hold = self.gather_s
        else:
            hold = release_at - oldest
        if traffic.owed and 4 * (traffic.owed + self.live_rows) <= self._full_at:
            # A small cohort is on its way back: one model call for all of it (see the module doc).
            hold = max(hold, traffic.owed_until - oldest)
        urgent = self.next_check()
        if urgent is not None:
            hold = min(hold, urgent - oldest)
        return max(0.0, hold)

    def take(self, now: float, *, drain: bool = False, hold_s: float = 0.0) -> list[Request]:
        """One batch to hand to the pool now ([] when nothing may leave yet).

        ``hold_s``: in adaptive mode, let a partial batch gather this long
        (see ``hold_for``); 0 sends it at once.  Call ``expire(now)`` first: a
        batch never starts with a request that cannot make its deadline.
        """
        if not (self.ready(now, hold_s) or (drain and self.live)):
            return []
        start = self._start_level()
        head = next(self._levels[start].order())
        batch = [head]
        if self.max_batch_size > 0:
            self._fill(batch, start, now)
            if self.static_sizes:
                self._fit_static(batch)
        # A level that got a member into this batch (its start, or filled in from below) was not
        # passed over; counting it as skipped let it start the next batch out of turn.
        served = {r.level for r in batch}
        for lv_index, lv in enumerate(self._levels):
            if lv_index in served:
                lv.skips = 0
            elif lv_index > start and lv.live:
                lv.skips += 1
        self._leave_all(batch, TAKEN)
        return batch

    def _fill(self, batch: list[Request], start: int, now: float) -> None:
        head = batch[0]
        rows = head.rows
        finish_by = head.deadline
        order = [start, *(i for i in range(len(self._levels)) if i != start)]
        for i in order:
            for r in self._levels[i].order():
                if r is head or r.shape != head.shape:
                    continue
                if rows + r.rows > self.cap:
                    return
                by = min(finish_by, r.deadline)
                if by != math.inf and now + self.latency.expected(rows + r.rows) > by:
                    return  # a bigger batch would make someone late: it leaves as it is
                batch.append(r)
                rows += r.rows
                finish_by = by

    def _fit_static(self, batch: list[Request]) -> None:
        """Cut a batch to a compiled size when that beats padding it to the next one."""
        sizes = self.static_sizes
        rows = sum(r.rows for r in batch)
        if rows in sizes:
            return
        up = next((s for s in sizes if s >= rows), None)
        down = max((s for s in sizes if s < rows), default=None)
        if down is None:
            return
        rest = next((s for s in sizes if s >= rows - down), sizes[-1])
        cost = self.latency.compute
        if up is not None and cost(up) <= cost(down) + cost(rest):
            return
        while len(batch) > 1 and sum(r.rows for r in batch) > down:
            batch.pop()

    def requeue(self, batch: list[Request]) -> None:
        """Put back a batch that could not be handed over, ahead of everything else."""
        for r in reversed(batch):
            self._place(r, front=True)

