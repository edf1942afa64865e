"""Batch formation: a pure, clock-injected queue per model version.

The queue holds request groups (see broker.messages); a group is never split,
and gateways keep each group within max_batch_size rows.  The rules (Triton's
dynamic batcher, by rows):

* A batch never holds more than ``max_batch_size`` rows; requests keep FIFO order.
* A batch leaves at once when it is full: it reached ``max_batch_size``, the
  next request does not fit, or it reached the largest preferred batch size.
* Otherwise it leaves when its oldest request has waited ``max_queue_delay``
  (0 = leave immediately with whatever is queued).
* Models with ``max_batch_size == 0`` do not batch: every request is a batch.

Workers merge small batches that queue up behind a busy worker (see
``workers.worker``), so a short delay does not cost batch size under load.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from broker.messages import Group


@dataclass(slots=True)
class Pending:
    entry_id: bytes
    group: Group
    arrived: float  # monotonic seconds


class ModelQueue:
    def __init__(self, max_batch_size: int, max_delay_s: float, preferred: tuple[int, ...] = ()) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._full_at = max(preferred) if preferred else max_batch_size
        self._queue: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, pending: Pending) -> None:
        self._queue.append(pending)

    def requeue(self, batch: list[Pending]) -> None:
        """Put a batch that could not be handed over back at the front, in order."""
        self._queue.extendleft(reversed(batch))

    def next_due(self) -> float | None:
        """Monotonic time at which the oldest request's wait runs out."""
        return self._queue[0].arrived + self.max_delay_s if self._queue else None

    def take_ready(self, now: float, *, drain: bool = False) -> list[list[Pending]]:
        batches: list[list[Pending]] = []
        q = self._queue
        if self.max_batch_size == 0:
            while q:
                batches.append([q.popleft()])
            return batches
        while q:
            rows, n = 0, 0
            for p in q:
                if rows + p.group.rows > self.max_batch_size:
                    break
                rows += p.group.rows
                n += 1
            n = max(n, 1)  # gateways keep groups <= max_batch_size; never stall
            full = rows >= self._full_at or n < len(q)
            if not (full or drain or now - q[0].arrived >= self.max_delay_s):
                break
            batches.append([q.popleft() for _ in range(n)])
        return batches
