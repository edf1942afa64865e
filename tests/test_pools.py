"""broker.pools.route, on its own: which pool gets a model's next batch."""

from __future__ import annotations

import math

from broker.latency import LatencyModel
from broker.pools import Pool, fastest, least_loaded, route


def _latency(per_row: float) -> LatencyModel:
    m = LatencyModel()
    for rows in (1, 4):
        m.observe(rows, per_row * rows)
    return m


def _options() -> list[tuple[Pool, LatencyModel]]:
    return [(Pool("cheap", "s1"), _latency(0.004)), (Pool("pricey", "s2"), _latency(0.001))]


def _route(options: list[tuple[Pool, LatencyModel]], workers: dict[str, int], room: dict[str, int],
           urgent: float | None = None, now: float = 0.0) -> str | None:
    choice = route(options, workers=lambda p: workers.get(p, 0), room=lambda p: room.get(p.name, 2),
                   formed=lambda p: (), now=now, urgent=urgent)
    return None if choice is None else choice.pool.name


def test_the_cheapest_live_pool_with_room_wins() -> None:
    opts = _options()
    assert _route(opts, {"cheap": 1, "pricey": 1}, {}) == "cheap"
    assert _route(opts, {"cheap": 1, "pricey": 1}, {"cheap": 0}) == "pricey"  # full: spill over
    assert _route(opts, {"cheap": 0, "pricey": 1}, {}) == "pricey"  # never a pool with no live worker
    assert _route(opts, {"cheap": 0, "pricey": 0}, {}) is None
    assert _route(opts, {"cheap": 1, "pricey": 1}, {"cheap": 0, "pricey": 0}) is None


def test_a_pool_that_cannot_start_in_time_is_passed_over() -> None:
    opts = _options()
    cheap = opts[0][0]
    cheap.dispatched(b"1-0", 0.0, 4, 0.016, 1, b"m")  # its only worker is busy until 16 ms
    assert _route(opts, {"cheap": 1, "pricey": 1}, {}, urgent=0.010) == "pricey"
    assert _route(opts, {"cheap": 1, "pricey": 1}, {}, urgent=0.020) == "cheap"  # in time: cheaper
    assert _route(opts, {"cheap": 1, "pricey": 1}, {}, urgent=None) == "cheap"
    # When none is in time, the one that frees up first.
    opts[1][0].dispatched(b"2-0", 0.0, 4, 0.030, 1, b"m")
    assert _route(opts, {"cheap": 1, "pricey": 1}, {}, urgent=0.005) == "cheap"


def test_release_time_is_a_hop_before_the_worker_frees_up() -> None:
    opts = _options()
    cheap = opts[0][0]
    cheap.observe_hop(0.001)
    cheap.dispatched(b"1-0", 0.0, 4, 0.016, 1, b"m")
    choice = route(opts, workers=lambda p: 1, room=lambda p: 2, formed=lambda p: (), now=0.0, urgent=None)
    assert choice is not None and math.isclose(choice.release_at, 0.015)
    # An idle worker: leave at once.
    choice = route(opts, workers=lambda p: 2, room=lambda p: 2, formed=lambda p: (), now=0.0, urgent=None)
    assert choice is not None and choice.release_at == -math.inf


def test_deadline_checks_use_the_fastest_live_pool_and_the_least_loaded_backlog() -> None:
    opts = _options()
    opts[0][0].dispatched(b"1-0", 0.0, 4, 0.016, 1, b"m")
    assert fastest(opts, lambda p: 1) is opts[1][1]
    assert fastest(opts, lambda p: 1 if p == "cheap" else 0) is opts[0][1]
    assert fastest(opts, lambda p: 0) is None
    assert least_loaded(opts, lambda p: 1) == 0
    assert least_loaded(opts, lambda p: 1 if p == "cheap" else 0) == 4


def test_a_batch_gone_from_the_stream_is_lost_only_at_the_second_check() -> None:
    pool = Pool("cpu", "s")
    for entry in (b"1-0", b"2-0"):
        pool.dispatched(entry, at=0.0, rows=1, compute=0.001, workers=1, model=b"m")
    # First check: both gone from the stream, their notices maybe still on the way.
    assert not pool.lost(b"1-0") and not pool.lost(b"2-0")
    assert set(pool.unfinished) == {b"1-0", b"2-0"}
    assert pool.finished(b"1-0", at=0.01) is not None  # its notice arrives between the checks
    # Second check: only the entry whose notice never came is lost, and counted as finished.
    assert pool.lost(b"2-0")
    assert pool.unfinished == {} and pool.missing == set()
    # A later notice for it is remembered as early, not counted twice.
    assert pool.finished(b"2-0", at=0.1) is None
