"""What a pool's batches are expected to cost, learned from the batches it ran.

``LatencyModel`` fits a batch's duration to its rows; ``worker_free_at`` plays the
batches handed to a pool forward to when a worker frees up.  The scheduler
(broker.scheduler) checks deadlines and times adaptive batches with them; the
pools (broker.pools) route batches and learn each hop's cost.
"""

from __future__ import annotations

import heapq
import math

# A dispatch-to-done sample above this multiple of the current estimate (plus a floor) is clipped
# before it is averaged in. A batch that waited out a Redis failover or a dead worker's takeover
# says nothing about the normal cost of a hop, and one such 3 s sample used to raise the estimate
# from milliseconds to a third of a second: admission then saw the pool as 100x slower and
# rejected requests as hopeless (a chaos run caught it). A real slowdown still gets through:
# each sample may raise the estimate by up to 20%.
OUTLIER_FACTOR = 3.0
OUTLIER_FLOOR_S = 0.005


def smooth(current: float, sample: float) -> float:
    """Exponential average (weight 0.1) of ``sample`` into ``current``, outliers clipped."""
    return 0.9 * current + 0.1 * min(max(0.0, sample), OUTLIER_FACTOR * current + OUTLIER_FLOOR_S)


class LatencyModel:
    """Batch duration ≈ a·rows + b, fitted online from measured batches.

    Least squares with exponential forgetting (half-life ``half_life``
    batches), so the fit follows a changed machine or load within a few dozen
    batches.  While every sample has the same size the slope is unknown; then
    the duration is assumed proportional to rows, which over-estimates big
    batches, the safe side for deadline checks.  ``overhead`` is the rest of
    a batch's dispatch-to-done time (Redis hops, waiting in the pool stream).
    """

    def __init__(self, half_life: float = 64.0) -> None:
        self._decay = 0.5 ** (1.0 / half_life)
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.a = 0.0
        self.b = 0.0
        self.overhead = 0.0
        self.samples = 0

    def observe(self, rows: int, seconds: float) -> None:
        d = self._decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + rows
        self._y = self._y * d + seconds
        self._xx = self._xx * d + rows * rows
        self._xy = self._xy * d + rows * seconds
        self.samples += 1
        w, x, y = self._w, self._x, self._y
        var = w * self._xx - x * x
        if var > 1e-9 * w * w:
            a = (w * self._xy - x * y) / var
            b = (y - a * x) / w
            if a < 0:  # noise around a flat cost
                a, b = 0.0, y / w
            elif b < 0:  # noise around a proportional cost
                a, b = self._xy / self._xx, 0.0
            self.a, self.b = a, b
            return
        # One batch size seen so far: assume cost proportional to rows.
        self.a, self.b = (self._xy / self._xx if self._xx else 0.0), 0.0

    def observe_overhead(self, seconds: float) -> None:
        self.overhead = max(0.0, seconds) if self.samples <= 1 else smooth(self.overhead, seconds)

    def compute(self, rows: int) -> float:
        return self.a * rows + self.b

    def expected(self, rows: int) -> float:
        return self.a * rows + self.b + self.overhead


def worker_free_at(handed: list[tuple[float, float]], workers: int, now: float, formed: list[float]) -> float:
    """When one of ``workers`` is expected to be free for one more batch (-inf: one is idle now).

    ``handed``: (dispatch time, expected compute) of the unfinished batches, in
    dispatch order; ``formed``: expected compute of batches about to be sent at
    ``now``.  Workers take the stream's batches in order, each as soon as it is
    free, and run each for its expected time.
    """
    free = [-math.inf] * max(1, workers)
    for at, compute in handed:
        heapq.heappush(free, max(heapq.heappop(free), at) + compute)
    for compute in formed:
        heapq.heappush(free, max(heapq.heappop(free), now) + compute)
    return free[0]
