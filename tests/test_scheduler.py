"""The batch former's rules, as properties over random sequences of arrivals, cancellations and dispatches.

The scheduler is pure (clock injected), so these run without Redis; the
integration tests in test_scheduling.py check the same rules through a real cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.latency import LatencyModel, worker_free_at
from broker.requests import QUEUED, Entry, Request
from broker.scheduler import ModelScheduler


def _request(i: int, rows: int, now: float, *, level: int = 0, shape: str = "", deadline: float = math.inf,
             timeout_at: float = math.inf) -> Request:
    return Request(Entry(b"%d-0" % i, 1, 1), "gw", i, rows, 0, now, deadline, timeout_at, level, shape)


def _fixed(a: float, b: float) -> LatencyModel:
    model = LatencyModel()
    model.a, model.b = a, b
    return model


@dataclass
class Op:
    kind: str  # add | cancel | take | tick
    rows: int = 1
    level: int = 0
    shape: str = ""
    slack: float = math.inf  # deadline - now at arrival
    timeout: float = math.inf
    gap: float = 0.0
    pick: int = 0


ops = st.lists(
    st.one_of(
        st.builds(Op, kind=st.just("add"), rows=st.integers(1, 6), level=st.integers(0, 2),
                  shape=st.sampled_from(["", "a", "b"]),
                  slack=st.one_of(st.just(math.inf), st.floats(0.0, 0.05)),
                  timeout=st.one_of(st.just(math.inf), st.floats(0.0, 0.03))),
        st.builds(Op, kind=st.just("cancel"), pick=st.integers(0, 200)),
        st.builds(Op, kind=st.just("take"), pick=st.integers(1, 3)),
        st.builds(Op, kind=st.just("tick"), gap=st.floats(0.0, 0.01)),
    ),
    min_size=1, max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(ops=ops, max_batch=st.integers(1, 16), delay=st.booleans(),
       window=st.one_of(st.none(), st.sampled_from([0.0, 0.002])), limit=st.integers(1, 4))
# Found by CI (2026-11-27): a request delayed by its queue timeout went to the back of the arrival
# order, so the window counted from a younger request and a batch that was due did not leave.
@example(ops=[Op("add"), Op("add", timeout=0.017578125), Op("cancel", pick=0), Op("tick", gap=0.009765625),
              Op("tick", gap=0.005859375), Op("add"), Op("tick", gap=0.001953125), Op("take", pick=1)],
         max_batch=3, delay=True, window=0.002, limit=1)
def test_every_rule_holds_over_random_histories(ops: list[Op], max_batch: int, delay: bool,
                                                window: float | None, limit: int) -> None:
    latency = _fixed(0.002, 0.002)
    levels = 3
    s = ModelScheduler("m", max_batch_size=max_batch, levels=levels, delay_on_timeout=delay, window_s=window,
                       starvation_limit=limit, latency=latency)
    now = 0.0
    reqs: list[Request] = []
    fate: dict[int, str] = {}
    passed_over = [0] * levels  # batches in a row that a waiting level got nothing from
    for op in ops:
        if op.kind == "add":
            rows = min(op.rows, max_batch)
            r = _request(len(reqs), rows, now, level=op.level, shape=op.shape, deadline=now + op.slack,
                         timeout_at=now + op.timeout)
            reqs.append(r)
            s.add(r)
        elif op.kind == "cancel" and reqs:
            r = reqs[op.pick % len(reqs)]
            if s.cancel(r.gateway, r.corr) is not None:
                assert r.corr not in fate
                fate[r.corr] = "cancelled"
        elif op.kind == "tick":
            now += op.gap
        for rej in s.expire(now):
            r = rej.request
            assert r.corr not in fate
            # Rejected only when it really could not make it (or timed out under REJECT).
            assert (now + latency.expected(r.rows) >= r.deadline or (not delay and r.timeout_at <= now)
                    or r.doomed > 0)
            fate[r.corr] = "rejected"
        # After expire, every queued request can still finish alone in time.
        for r in reqs:
            if r.state == QUEUED:
                assert now + latency.expected(r.rows) < r.deadline
                assert delay or r.timeout_at > now
        if op.kind != "take":
            continue
        for _ in range(op.pick):
            waiting = {r.level for r in reqs if r.state == QUEUED}
            oldest = min((r.arrived for r in reqs if r.state == QUEUED), default=now)
            queued_rows = sum(r.rows for r in reqs if r.state == QUEUED)
            batch = s.take(now)
            if not batch:
                assert not waiting or (window is not None and now - oldest < window and queued_rows < max_batch)
                break
            rows = sum(r.rows for r in batch)
            assert rows <= max_batch
            assert len({r.shape for r in batch}) == 1, "mixed shapes"
            for r in batch:
                assert r.corr not in fate, "request in two batches"
                fate[r.corr] = "batched"
                assert now + latency.expected(rows) <= r.deadline, "member dispatched past its deadline"
            if window is not None and queued_rows < max_batch:
                assert now - oldest >= window, "a partial batch left before its window closed"
            # FIFO within a level and shape (requests moved to a delayed queue go behind).
            for b in batch:
                for a in reqs[: b.corr]:
                    if (a.level, a.shape, a.delayed, b.delayed) == (b.level, b.shape, False, False):
                        assert a.state != QUEUED, f"{b.corr} overtook {a.corr}"
            # Priority: the batch starts from the highest waiting level unless one is starving.
            head = batch[0].level
            assert head == min(waiting) or passed_over[head] >= limit
            got = {r.level for r in batch}
            for lvl in waiting:
                passed_over[lvl] = 0 if lvl in got else passed_over[lvl] + 1
                assert passed_over[lvl] <= limit + levels - 1, "starvation bound broken"
    while batch := s.take(now, drain=True):
        for r in batch:
            fate[r.corr] = "drained"
    assert sorted(fate) == list(range(len(reqs))), "a request was lost"
    assert len(s) == 0


def test_a_request_that_cannot_finish_is_rejected_as_soon_as_that_is_known() -> None:
    s = ModelScheduler("m", max_batch_size=8, latency=_fixed(0.001, 0.004))  # 5 ms for one row
    s.add(_request(0, 1, 0.0, deadline=0.020))
    assert s.next_check() == pytest.approx(0.015)
    assert s.expire(0.0149) == []
    (rej,) = s.expire(0.0151)
    assert "cannot finish before its deadline" in rej.message
    assert len(s) == 0


def test_a_batch_stops_growing_where_it_would_make_a_member_late() -> None:
    s = ModelScheduler("m", max_batch_size=32, latency=_fixed(0.001, 0.0))
    s.add(_request(0, 1, 0.0, deadline=0.0045))  # fits a batch of at most 4 rows
    for i in range(1, 10):
        s.add(_request(i, 1, 0.0))
    assert [r.corr for r in s.take(0.0)] == [0, 1, 2, 3]
    assert len(s.take(0.0)) == 6


def test_delay_puts_timed_out_requests_behind_their_level_but_before_lower_levels() -> None:
    s = ModelScheduler("m", max_batch_size=1, levels=2, delay_on_timeout=True)
    s.add(_request(0, 1, 0.0, level=0, timeout_at=0.001))
    s.add(_request(1, 1, 0.0, level=0))
    s.add(_request(2, 1, 0.0, level=1))
    assert s.expire(0.002) == []
    assert [s.take(0.002)[0].corr for _ in range(3)] == [1, 0, 2]


def test_reject_fails_a_timed_out_request() -> None:
    s = ModelScheduler("m", max_batch_size=4)
    s.add(_request(0, 1, 0.0, timeout_at=0.001))
    (rej,) = s.expire(0.001)
    assert "timed out in the queue" in rej.message


def test_starvation_limit_lets_a_low_level_through() -> None:
    s = ModelScheduler("m", max_batch_size=1, levels=2, starvation_limit=3)
    s.add(_request(0, 1, 0.0, level=1))
    for i in range(1, 20):
        s.add(_request(i, 1, 0.0, level=0))
    order = [s.take(0.0)[0].corr for _ in range(5)]
    assert order == [1, 2, 3, 0, 4]


def test_static_sizes_cut_or_pad_by_the_latency_model() -> None:
    # Cost dominated by rows (CPU-like): 9 rows go as 8 now (+1 later), not padded to 16.
    s = ModelScheduler("m", max_batch_size=16, static_sizes=(1, 8, 16), latency=_fixed(0.001, 0.0))
    for i in range(9):
        s.add(_request(i, 1, 0.0))
    assert len(s.take(0.0)) == 8
    # Cost dominated by the fixed part (GPU-like): the same 9 rows are padded to 16.
    s = ModelScheduler("m", max_batch_size=16, static_sizes=(1, 8, 16), latency=_fixed(0.00001, 0.005))
    for i in range(9):
        s.add(_request(i, 1, 0.0))
    assert len(s.take(0.0)) == 9


def test_requeued_batch_goes_out_first_and_only_once() -> None:
    s = ModelScheduler("m", max_batch_size=2)
    for i in range(4):
        s.add(_request(i, 1, 0.0))
    first = s.take(0.0)
    s.requeue(first)
    assert [r.corr for r in s.take(0.0)] == [0, 1]
    assert [r.corr for r in s.take(0.0)] == [2, 3]
    assert s.take(0.0) == []


def test_unbatched_models_send_one_request_per_batch() -> None:
    s = ModelScheduler("m", max_batch_size=0)
    for i in range(3):
        s.add(_request(i, 1, 0.0))
    assert [len(s.take(0.0)) for _ in range(4)] == [1, 1, 1, 0]


def test_memory_follows_the_queue_not_the_traffic() -> None:
    s = ModelScheduler("m", max_batch_size=4, levels=2)
    for i in range(10_000):
        s.add(_request(i, 1, 0.0, level=i % 2, shape="ab"[i % 3 == 0], deadline=1e9))
        if i % 3 == 2:
            while s.take(0.0):
                pass
    assert len(s._checks) < 4 * len(s) + 300


@pytest.mark.parametrize(("a", "b"), [(0.001, 0.002), (0.0, 0.003), (0.0005, 0.0)])
def test_latency_model_recovers_a_linear_cost(a: float, b: float) -> None:
    m = LatencyModel()
    for rows in [1, 4, 8, 16, 32] * 20:
        m.observe(rows, a * rows + b)
    assert m.compute(10) == pytest.approx(a * 10 + b, rel=1e-3, abs=1e-7)


def test_latency_model_assumes_proportional_cost_from_one_batch_size() -> None:
    m = LatencyModel()
    for _ in range(10):
        m.observe(4, 0.004)
    assert m.compute(8) == pytest.approx(0.008)


def test_adaptive_hold_gathers_until_release_but_never_past_the_most_urgent_check() -> None:
    s = ModelScheduler("m", max_batch_size=32, latency=_fixed(0.0, 0.002))  # a batch costs 2 ms
    s.add(_request(0, 1, 0.010))
    # A worker is idle (release already passed): the batch leaves at once.
    assert s.hold_for(-math.inf) == 0.0 and s.ready(0.010, s.hold_for(-math.inf))
    # Every worker busy until 15 ms: gather until then.
    hold = s.hold_for(0.015)
    assert hold == pytest.approx(0.005)
    assert not s.ready(0.0149, hold) and s.ready(0.015 + 1e-9, hold)
    assert s.window_closes(hold) == pytest.approx(0.015)
    # Never so long that the most urgent member would be rejected instead.
    s.add(_request(1, 1, 0.011, deadline=0.0135))
    assert s.hold_for(0.015) == pytest.approx(0.0135 - 0.002 - 0.010)
    # A fixed window ignores the pool.
    f = ModelScheduler("m", max_batch_size=32, window_s=0.001, latency=_fixed(0.0, 0.002))
    f.add(_request(0, 1, 0.0))
    assert f.hold_for(0.5) == 0.0 and f.ready(0.001)


def test_adaptive_gathers_for_a_free_worker_only_when_arrivals_are_frequent() -> None:
    slow = ModelScheduler("m", max_batch_size=32, gather_s=0.002, latency=_fixed(0.0, 0.001))
    for i in range(20):  # 100/s: 0.2 expected within the 2 ms gather window
        slow.add(_request(i, 1, i * 0.010))
    assert slow.traffic.rate == pytest.approx(100)
    assert slow.hold_for(-math.inf) == 0.0  # a free worker gets the batch at once
    busy = ModelScheduler("m", max_batch_size=32, gather_s=0.002, latency=_fixed(0.0, 0.001))
    for i in range(20):  # 5,000/s, arriving in reads of 5 every millisecond: 10 expected
        busy.add(_request(i, 1, (i // 5) * 0.001))
    assert busy.traffic.rate == pytest.approx(5000)
    assert busy.hold_for(-math.inf) == pytest.approx(0.002)
    assert busy.hold_for(0.010) == pytest.approx(0.002)  # under load the window alone, busy worker or not
    off = ModelScheduler("m", max_batch_size=32, gather_s=0.0, latency=_fixed(0.0, 0.001))
    for i in range(20):
        off.add(_request(i, 1, (i // 5) * 0.001))
    assert off.hold_for(-math.inf) == 0.0

def test_without_just_in_time_a_slow_trickle_gathers_while_the_gateways_hold_more_calls() -> None:
    """All processes on one core: an idle worker is no sign of a free core, so a partial batch
    waits for the calls the gateways hold; a lone call, with nothing to wait for, leaves at once."""
    s = ModelScheduler("m", max_batch_size=32, gather_s=0.002, just_in_time=False, latency=_fixed(0.0, 0.001))
    s.traffic.note_holding("gw", 1, 0.0)
    s.add(_request(0, 1, 0.0))  # 1 call held, 1 queued: nobody else exists
    assert s.hold_for(-math.inf) == 0.0
    s.traffic.note_holding("gw", 4, 0.010)  # the gateway now holds 4 calls, 1 of them queued here
    assert s.hold_for(-math.inf) == pytest.approx(0.002)
    s.traffic.note_holding("other", 3, 0.010)
    s.traffic.note_holding("gw", 0, 0.011)  # 0: this gateway stopped saying
    assert s.hold_for(-math.inf) == pytest.approx(0.002)  # the other gateway's 3 calls still count
    s.take(0.5, drain=True)
    s.add(_request(1, 1, 2.0))  # more than HOLDING_MEMORY_S later: the counts are stale
    assert s.hold_for(-math.inf) == 0.0
    # With just-in-time (the default) the counts change nothing.
    j = ModelScheduler("m", max_batch_size=32, gather_s=0.002, latency=_fixed(0.0, 0.001))
    j.traffic.note_holding("gw", 10, 0.0)
    j.add(_request(0, 1, 0.0))
    assert j.hold_for(-math.inf) == 0.0


def _sent_at(i: int, now: float, enqueued_ns: int) -> Request:
    r = _request(i, 1, now)
    r.enqueued_ns = enqueued_ns
    return r


def test_return_wait_holds_a_small_batch_for_the_callers_just_answered() -> None:
    """Closed-loop callers come back after their replies: a partial batch waits for as many new
    requests as the last batch answered (up to return_wait_s), then leaves as one model call."""
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    for i in range(4):  # queued while the last batch ran: sent before its replies left
        s.add(_sent_at(i, 1.0, enqueued_ns=100))
    s.traffic.finished(4, 1.001, replied_ns=200)  # that batch answered 4 callers
    hold = s.hold_for(-math.inf)
    assert hold == pytest.approx(0.0035)  # from the oldest arrival (1.0) to 2.5 ms after the replies
    assert s.take(1.002, hold_s=hold) == []
    for i in range(4, 7):
        s.add(_sent_at(i, 1.0015, enqueued_ns=300))  # 3 of the 4 are back
    assert s.take(1.002, hold_s=s.hold_for(-math.inf)) == []
    s.add(_sent_at(7, 1.002, enqueued_ns=400))  # the last one: nobody is owed any more
    assert len(s.take(1.002, hold_s=s.hold_for(-math.inf))) == 8


def test_return_wait_follows_callers_that_trickle_back() -> None:
    """Callers coming back one at a time each give the rest half the wait again, so the last of a
    slow cohort still joins its batch (cut off at 2.5 ms, it would wait out a whole extra batch);
    never past twice the wait after the replies."""
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    s.traffic.finished(8, 1.000, replied_ns=100)
    for i, at in enumerate((1.0015, 1.002, 1.0025, 1.003)):  # half a millisecond apart
        s.add(_sent_at(i, at, enqueued_ns=200 + i))
    hold = s.hold_for(-math.inf)
    assert hold == pytest.approx(0.003 + 0.00125 - 0.0015)  # until 1.25 ms after the latest
    assert s.take(1.0026, hold_s=hold) == []  # past 2.5 ms after the replies, still waiting
    for i, at in enumerate((1.0035, 1.004, 1.0045), start=4):
        s.add(_sent_at(i, at, enqueued_ns=300 + i))
    assert s.hold_for(-math.inf) == pytest.approx(0.005 - 0.0015)  # capped at 5 ms after the replies
    assert s.take(1.0049, hold_s=s.hold_for(-math.inf)) == []
    assert len(s.take(1.005, hold_s=s.hold_for(-math.inf))) == 7  # the eighth never came


def test_return_wait_ends_and_ignores_requests_sent_before_the_replies() -> None:
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    s.traffic.finished(2, 1.0, replied_ns=1_000)
    s.add(_sent_at(0, 1.0001, enqueued_ns=999))  # read after the replies, sent before them
    s.add(_sent_at(1, 1.0001, enqueued_ns=999))
    hold = s.hold_for(-math.inf)
    assert hold == pytest.approx(0.0024)  # still owed 2: it waits until 2.5 ms after the replies
    assert s.take(1.0024, hold_s=hold) == []
    assert len(s.take(1.0025, hold_s=hold)) == 2  # the callers did not come back: the wait is over
    s.traffic.finished(2, 1.0030, replied_ns=2_000)
    s.add(_sent_at(2, 1.0200, enqueued_ns=3_000))  # after the wait: a new debt is not this one
    assert s.hold_for(-math.inf) == 0.0


def test_return_wait_leaves_big_cohorts_and_the_default_alone() -> None:
    """A cohort over a quarter of a batch keeps two batches in turn, one computing while the other's
    callers come back; without return_wait_s (the scheduler's default) nothing waits at all."""
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    for i in range(4):
        s.add(_sent_at(i, 1.0, enqueued_ns=100))
    s.traffic.finished(4, 1.001, replied_ns=200)
    assert s.hold_for(-math.inf) > 0  # 4 owed + 4 queued: a quarter of 32, held
    s.add(_sent_at(4, 1.0, enqueued_ns=100))
    assert s.hold_for(-math.inf) == 0.0  # 4 owed + 5 queued: over a quarter
    d = ModelScheduler("m", max_batch_size=32, latency=_fixed(0.0, 0.001))
    d.add(_sent_at(0, 1.0, enqueued_ns=100))
    d.traffic.finished(4, 1.001, replied_ns=200)
    assert d.hold_for(-math.inf) == 0.0


def test_a_request_behind_a_queue_it_cannot_outwait_is_rejected_on_arrival() -> None:
    s = ModelScheduler("m", max_batch_size=4, latency=_fixed(0.0025, 0.0))  # 4 rows in 10 ms
    for t in range(1, 11):  # and it drains 4 rows every 10 ms: 400 rows/s
        s.traffic.finished(4, t * 0.010)
    for i in range(40):  # 40 rows queued: about 100 ms of work
        s.add(_request(i, 1, 0.1))
    s.add(_request(40, 1, 0.1, deadline=0.15))  # 50 ms to live: cannot outwait the queue
    s.add(_request(41, 1, 0.1, deadline=0.5))  # 400 ms: can
    (rej,) = s.expire(0.1)
    assert rej.request.corr == 40 and "queued ahead" in rej.message
    assert len(s) == 41


def test_below_saturation_the_models_own_speed_bounds_the_wait() -> None:
    # Done notices 100 ms apart say 10 rows/s, but that is the arrival rate: the model computes
    # 1,000 rows/s, so a short deadline behind one queued row is still admitted.
    s = ModelScheduler("m", max_batch_size=4, latency=_fixed(0.001, 0.0))
    for t in range(1, 6):
        s.traffic.finished(1, t * 0.1)
    s.add(_request(0, 1, 0.5))
    s.add(_request(1, 1, 0.5, deadline=0.51))
    assert s.expire(0.5) == []


def test_worker_free_at_follows_the_batches_handed_to_the_pool() -> None:
    assert worker_free_at([], 2, 0.0, []) == -math.inf  # idle workers: no reason to wait
    assert worker_free_at([(0.0, 0.004)], 2, 0.001, []) == -math.inf  # one of two still idle
    # Two workers, each with a running batch: the first frees at 3 ms.
    assert worker_free_at([(0.0, 0.004), (0.001, 0.002)], 2, 0.001, []) == pytest.approx(0.003)
    # A third batch queues behind the first to free, so the next free worker is at 4 ms.
    assert worker_free_at([(0.0, 0.004), (0.001, 0.002), (0.001, 0.003)], 2, 0.001, []) == pytest.approx(0.004)
    # Batches formed this round count as starting now or when a worker frees, whichever is later.
    assert worker_free_at([(0.0, 0.004)], 2, 0.001, [0.001]) == pytest.approx(0.002)
    assert worker_free_at([], 0, 0.0, [0.002]) == pytest.approx(0.002)  # no live worker counts as one


def test_one_batch_that_waited_out_an_outage_does_not_make_the_pool_look_slow() -> None:
    lat = LatencyModel()
    for _ in range(20):
        lat.observe(8, 0.001)
        lat.observe_overhead(0.002)
    assert lat.overhead == pytest.approx(0.002)
    lat.observe(8, 0.001)
    lat.observe_overhead(3.0)  # dispatched just before a Redis failover, done after it
    assert lat.overhead < 0.004, lat.overhead
    # A lasting slowdown is still learned: 50 ms hops are believed within a few dozen batches.
    for _ in range(40):
        lat.observe(8, 0.001)
        lat.observe_overhead(0.05)
    assert lat.overhead == pytest.approx(0.05, rel=0.05)


def test_a_level_filled_into_a_batch_is_not_counted_as_skipped() -> None:
    """Found by the property test above: a level-2 request that rode along in a level-0 batch left
    level 2 counted as passed over, and with starvation_limit 1 it then started the next batch
    ahead of a waiting level 0."""
    s = ModelScheduler("m", max_batch_size=5, levels=3, starvation_limit=1, latency=_fixed(0.002, 0.002))
    for i in range(4):
        s.add(_request(i, 1, 0.0, level=0))
    s.add(_request(4, 1, 0.0, level=2))
    assert [r.level for r in s.take(0.0)] == [0, 0, 0, 0, 2]
    s.add(_request(5, 1, 0.0, level=0))
    s.add(_request(6, 1, 0.0, level=2))
    assert [r.level for r in s.take(0.0)] == [0, 2]


def test_return_wait_is_off_while_the_broker_says_the_cpus_are_not_saturated() -> None:
    """The broker clears ``return_wait_active`` while its CPUs have idle time (broker.cpu_load):
    then a finished batch leaves no callers owed and nothing waits for them."""
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    s.traffic.return_wait_active = False
    s.add(_sent_at(0, 1.0, enqueued_ns=100))
    s.traffic.finished(4, 1.001, replied_ns=200)
    assert s.hold_for(-math.inf) == 0.0
    s.traffic.return_wait_active = True
    s.traffic.finished(4, 1.002, replied_ns=300)
    assert s.hold_for(-math.inf) == pytest.approx(0.0045)  # from the oldest arrival to 2.5 ms after


def test_return_wait_counts_callers_of_an_earlier_batch_still_on_their_way() -> None:
    """Two batches finish before the first one's callers are back: those callers, sent after the
    first replies but before the second's, pay the debt as much as the second batch's callers."""
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    s.traffic.finished(2, 1.000, replied_ns=100)
    s.traffic.finished(2, 1.001, replied_ns=200)
    for i, sent in enumerate((150, 160, 250)):
        s.add(_sent_at(i, 1.0015, enqueued_ns=sent))
    assert s.hold_for(-math.inf) > 0  # one caller still owed
    s.add(_sent_at(3, 1.0016, enqueued_ns=260))
    assert s.hold_for(-math.inf) == 0.0  # all four back: the batch leaves


def test_return_wait_expects_nobody_when_the_reply_time_is_unknown() -> None:
    """A stream worker's done notice arrives after its replies and says nothing of when they left
    (replied_ns 0): requests already on their way would pass for returning callers, so no wait."""
    s = ModelScheduler("m", max_batch_size=32, return_wait_s=0.0025, latency=_fixed(0.0, 0.001))
    s.add(_sent_at(0, 1.0, enqueued_ns=100))
    s.traffic.finished(4, 1.001)
    assert s.hold_for(-math.inf) == 0.0
    s.traffic.finished(4, 1.002, replied_ns=300)
    assert s.hold_for(-math.inf) > 0
