"""Capacity planning for ``ferry profile``: what one worker of each pool sustains, and the cheapest
set of workers (one pool, or a mix of two) that carries a target load with every batch's p99 under
a bound.  Pure functions over measurements; no hardware library, no protos.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.errors import ConfigError

# Beyond this many splits of one two-pool mix the search stops.  The walk ends far sooner unless both
# pools cost exactly the same per inference, where the remaining splits differ by rounding alone.
MAX_SPLITS = 10_000

# ------------------------------------------------------------------------------ results --


@dataclass(frozen=True, slots=True)
class Measurement:
    """One pool at one batch size: ``calls`` back-to-back runs of one batch."""

    batch_size: int  # rows of real requests per batch
    padded_to: int  # rows the model computed (ferry.batch_sizes pads); == batch_size otherwise
    calls: int
    seconds: float
    batches_per_s: float
    inferences_per_s: float
    p50_ms: float
    p99_ms: float
    cost_per_million: float  # cost_per_worker_hour / (inferences_per_s * 3600) * 1e6
    error: str = ""  # the run failed (e.g. out of device memory): no figures


@dataclass(frozen=True, slots=True)
class PoolResult:
    pool: str
    cost_per_hour: float  # one worker, from ferry.pools
    runtime: str = ""
    devices: tuple[str, ...] = ()
    unavailable: str = ""  # why the runtime cannot load here; "" = profiled
    notes: tuple[str, ...] = ()
    rows: tuple[Measurement, ...] = ()


@dataclass(frozen=True, slots=True)
class Allocation:
    pool: str
    workers: int
    batch_size: int
    inferences_per_s: float  # one worker at batch_size
    p99_ms: float  # one batch at batch_size
    cost_per_hour: float  # one worker


@dataclass(frozen=True, slots=True)
class Option:
    allocations: tuple[Allocation, ...]
    workers: int
    hourly_cost: float
    capacity: float  # inferences/s with every worker busy
    cost_per_million: float  # at the target load: hourly_cost / (target_rps * 3600) * 1e6


@dataclass(frozen=True, slots=True)
class Closest:
    pool: str
    batch_size: int
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Plan:
    target_rps: float
    p99_ms: float
    best: Option | None  # None: no pool meets the p99 bound
    single_pool: tuple[Option, ...]  # the cheapest plan on each pool alone, cheapest first
    closest: Closest | None  # when best is None: the lowest p99 measured


# ------------------------------------------------------------------------- pure logic --


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: with fewer than 100 calls the p99 is the slowest one, never an interpolation below it."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(batch_size: int, padded_to: int, latencies_ns: Sequence[int], elapsed_s: float,
              cost_per_hour: float) -> Measurement:
    """Figures for ``len(latencies_ns)`` back-to-back calls that took ``elapsed_s`` of wall time."""
    if not latencies_ns or elapsed_s <= 0:
        raise ValueError("need at least one call and a positive elapsed time")
    ms = sorted(x / 1e6 for x in latencies_ns)
    batches = len(ms) / elapsed_s
    inferences = batches * batch_size
    return Measurement(
        batch_size=batch_size, padded_to=padded_to, calls=len(ms), seconds=elapsed_s,
        batches_per_s=batches, inferences_per_s=inferences,
        p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99),
        cost_per_million=cost_per_hour / (inferences * 3600) * 1e6,
    )


def _workers_for(load: float, per_worker: float) -> int:
    # Measured rates are floats: 2.0000000001 workers is 2, not 3.
    return max(1, math.ceil(load / per_worker - 1e-9))


def _option(allocs: Sequence[Allocation], target_rps: float) -> Option:
    cost = sum(a.workers * a.cost_per_hour for a in allocs)
    return Option(
        allocations=tuple(allocs), workers=sum(a.workers for a in allocs), hourly_cost=cost,
        capacity=sum(a.workers * a.inferences_per_s for a in allocs),
        cost_per_million=cost / (target_rps * 3600) * 1e6,
    )


def _rank(o: Option) -> tuple[float, int, float, float, tuple[str, ...]]:
    # Cheapest; then fewest workers (less to run); then the lowest batch p99 (measured throughput
    # levels off, so several sizes often need the same workers); then most spare capacity; then by name.
    return (round(o.hourly_cost, 9), o.workers, max(a.p99_ms for a in o.allocations), -o.capacity,
            tuple(a.pool for a in o.allocations))


def _sizes_within(result: PoolResult, p99_ms: float) -> list[Allocation]:
    """The pool's batch sizes whose batch p99 is within the bound, as allocations of no workers yet."""
    return [Allocation(result.pool, 0, m.batch_size, m.inferences_per_s, m.p99_ms, result.cost_per_hour)
            for m in result.rows if not m.error and m.p99_ms <= p99_ms and m.inferences_per_s > 0]


def _alone(a: Allocation, target_rps: float) -> Option:
    return _option([dataclasses.replace(a, workers=_workers_for(target_rps, a.inferences_per_s))], target_rps)


def _mixes(a: Allocation, b: Allocation, target_rps: float, bound: float) -> Option | None:
    """The best split of ``target_rps`` with at least one worker of each of ``a`` and ``b`` that
    costs no more than ``bound``, if any.

    With k workers of ``a``, b needs ceil((target - k*ra) / rb): the cost is a linear function of k
    plus less than one b worker of rounding.  Walking k from the end the linear part favours, the
    walk stops once that linear part alone exceeds the best cost found."""
    n_a = _workers_for(target_rps, a.inferences_per_s)
    if n_a < 2 or a.cost_per_hour == b.cost_per_hour == 0:
        # Two free pools: the faster one alone costs nothing either, with no more workers than any mix.
        return None
    per_b = b.cost_per_hour / b.inferences_per_s
    slope = a.cost_per_hour - a.inferences_per_s * per_b
    ks = range(1, n_a) if slope >= 0 else range(n_a - 1, 0, -1)
    best: Option | None = None
    for i, k in enumerate(ks):
        if i >= MAX_SPLITS:
            break
        linear = k * a.cost_per_hour + (target_rps - k * a.inferences_per_s) * per_b
        if linear > min(bound, best.hourly_cost if best else bound) + 1e-9:
            break
        n_b = _workers_for(target_rps - k * a.inferences_per_s, b.inferences_per_s)
        opt = _option([dataclasses.replace(a, workers=k), dataclasses.replace(b, workers=n_b)], target_rps)
        if best is None or _rank(opt) < _rank(best):
            best = opt
    return best


def plan(results: Sequence[PoolResult], target_rps: float, p99_ms: float) -> Plan:
    """The cheapest workers (one pool, or two pools mixed) that carry ``target_rps`` inferences/s,
    each pool at one of its batch sizes whose batch p99 is at most ``p99_ms``.

    Every worker is assumed busy at that batch size all the time: a plan has no headroom, and
    queueing, batching delay and RPC come on top of the batch latency."""
    if not target_rps > 0:
        raise ValueError("target_rps must be > 0")
    if not p99_ms > 0:
        raise ValueError("p99_ms must be > 0")
    fits = {r.pool: c for r in results if not r.unavailable for c in [_sizes_within(r, p99_ms)] if c}
    singles = sorted((min((_alone(a, target_rps) for a in sizes), key=_rank) for sizes in fits.values()),
                     key=_rank)
    if not singles:
        measured = [Closest(r.pool, m.batch_size, m.p99_ms) for r in results if not r.unavailable
                    for m in r.rows if not m.error]
        closest = min(measured, key=lambda c: (c.p99_ms, c.pool, c.batch_size)) if measured else None
        return Plan(target_rps, p99_ms, None, (), closest)
    best = singles[0]
    pools = list(fits)
    for i, pa in enumerate(pools):
        for pb in pools[i + 1:]:
            for a, b in itertools.product(fits[pa], fits[pb]):
                for x, y in ((a, b), (b, a)):
                    mix = _mixes(x, y, target_rps, best.hourly_cost)
                    if mix is not None and _rank(mix) < _rank(best):
                        best = mix
    return Plan(target_rps, p99_ms, best, tuple(singles), None)


def default_batch_sizes(max_batch_size: int, static_sizes: Sequence[int]) -> tuple[int, ...]:
    """The compiled sizes when the model has them; else powers of two up to max_batch_size, and
    max_batch_size itself (the largest batch a worker gets); 1 for an unbatched model."""
    if max_batch_size <= 0:
        return (1,)
    if static_sizes:
        return tuple(sorted(static_sizes))
    sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r}: list positive integers, e.g. 1,4,16") from None
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"--batch-sizes {text!r}: list positive integers, e.g. 1,4,16")
    return tuple(sizes)


def parse_pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not key or not eq or not value:
            raise ConfigError(f"{flag} {item!r}: use NAME=VALUE")
        out[key] = value
    return out
