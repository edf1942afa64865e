"""What one model's scheduler knows about its callers, apart from the queue itself.

Four signals, each a few numbers updated as requests arrive and batches finish (broker.scheduler
reads them to decide how long a partial batch may wait):

- the arrival **rate**: requests per second, a moving average over the broker's reads;
- the **drain rate**: rows finished per second, what the pool gets through when saturated;
- the calls each gateway **holds** waiting for replies, from its latest request group (what
  ``just_in_time = false`` gathers for);
- the callers **owed** (``return_wait_s``): rows a finished batch answered whose callers have not
  sent their next request yet, until when to expect them (``return_wait_s`` after the replies,
  pushed to half of it after each caller that comes back, at most twice it after the replies), and
  the reply time their requests come after.
"""

from __future__ import annotations

# A gateway's count of the calls it holds (its latest group's) is forgotten after this long.
HOLDING_MEMORY_S = 1.0


class Traffic:
    def __init__(self, return_wait_s: float = 0.0) -> None:
        self.return_wait_s = return_wait_s
        # The broker turns return_wait_s off while its CPUs have idle time (broker.cpu_load).
        self.return_wait_active = True
        self.owed = 0
        self.owed_until = 0.0
        self._owed_cap = 0.0  # owed_until never moves past this (see ``arrive``)
        self._owed_after_ns = 0
        self._holding: dict[str, tuple[int, float]] = {}  # gateway -> (calls it holds, when it said so)
        self._last_arrival = 0.0
        self._burst = 0
        self._arrival_count = 0.0
        self._arrival_gap = 0.0
        self.rate = 0.0  # arrivals per second, a moving average
        self.drain_rate = 0.0  # rows finished per second, a moving average
        self._last_done = 0.0
        self._done_rows = 0.0
        self._done_gap = 0.0

    def arrive(self, arrived: float, enqueued_ns: int, rows: int) -> None:
        """A request read at ``arrived`` (monotonic), enqueued by its gateway at ``enqueued_ns``."""
        if arrived > self._last_arrival:
            # Requests arrive in reads (gateway groups, broker reads): the rate is requests per
            # read over time between reads, each a moving average (an average of per-read rates
            # would overrate bursty arrivals).
            if self._burst:
                gap = arrived - self._last_arrival
                if self._arrival_gap:
                    self._arrival_count = 0.9 * self._arrival_count + 0.1 * self._burst
                    self._arrival_gap = 0.9 * self._arrival_gap + 0.1 * gap
                else:
                    self._arrival_count, self._arrival_gap = self._burst, gap
                self.rate = self._arrival_count / self._arrival_gap
            self._last_arrival = arrived
            self._burst = 0
        self._burst += 1
        if self.owed and enqueued_ns >= self._owed_after_ns:
            self.owed = max(0, self.owed - rows)
            if self.owed:
                # Callers that trickle back one by one (each a broker wake on a busy core, half a
                # millisecond apart on a slow one) would otherwise outlast a wait counted from the
                # replies alone, and the last few would wait a whole extra batch. While they keep
                # coming, the rest get half the wait after each; never past twice it after the
                # replies.
                self.owed_until = min(self._owed_cap, max(self.owed_until, arrived + self.return_wait_s / 2))

    def note_holding(self, gateway: str, calls: int, now: float) -> None:
        """A gateway's latest count of the calls it holds waiting for replies (0: unknown)."""
        if calls > 0:
            self._holding[gateway] = (calls, now)
        else:
            self._holding.pop(gateway, None)

    def more_coming(self, now: float, queued: int) -> bool:
        """Whether gateways hold more calls than the ``queued`` requests: requests exist that may join."""
        held = 0
        for gateway, (calls, at) in list(self._holding.items()):
            if now - at > HOLDING_MEMORY_S:
                del self._holding[gateway]
            else:
                held += calls
        return held > queued

    def finished(self, rows: int, now: float, replied_ns: int = 0) -> None:
        """A batch of this model finished: track how fast queued rows drain, and (``return_wait_s``)
        expect its callers back.  ``replied_ns``: the wall clock just before its replies left (0:
        unknown, and then nobody is expected); requests enqueued earlier were not sent in answer
        to them."""
        if self._last_done:
            gap = now - self._last_done
            if gap > 0:
                self._done_rows = 0.9 * self._done_rows + 0.1 * rows if self._done_gap else rows
                self._done_gap = 0.9 * self._done_gap + 0.1 * gap if self._done_gap else gap
                self.drain_rate = self._done_rows / self._done_gap
        self._last_done = now
        if self.return_wait_s > 0 and self.return_wait_active and replied_ns:
            # Only a worker in the broker's process says when its replies left (broker.handoff);
            # a stream worker's done notice comes after them, so requests already on their way
            # would pass for returning callers.
            if now > self.owed_until:
                self.owed = 0
            if not self.owed:
                self._owed_after_ns = replied_ns
            # Otherwise the earlier batch's callers, sent after its replies and still on their way,
            # count as much as this one's: the debt keeps the earlier reply time.
            self.owed += rows
            self.owed_until = now + self.return_wait_s
            self._owed_cap = now + 2 * self.return_wait_s
