"""The batch former's rules, as properties over random arrival sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.batcher import ModelQueue, Pending
from broker.messages import Group


def _pending(i: int, rows: int, at: float) -> Pending:
    return Pending(b"%d-0" % i, Group("gw", 0, [i, rows], [b""], rows), at)


arrivals = st.lists(st.tuples(st.integers(1, 8), st.floats(0, 0.01)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(arrivals=arrivals, max_batch=st.integers(8, 32), delay=st.sampled_from([0.0, 0.001, 0.005]))
def test_batches_keep_every_rule(arrivals: list[tuple[int, float]], max_batch: int, delay: float) -> None:
    q = ModelQueue(max_batch, delay)
    now, sent = 0.0, []
    for i, (rows, gap) in enumerate(arrivals):
        now += gap
        q.add(_pending(i, rows, now))
        for batch in q.take_ready(now):
            # Never over max_batch_size; a partial batch only once its window closed.
            total = sum(p.group.rows for p in batch)
            assert total <= max_batch
            full = total + (q._queue[0].group.rows if len(q) else max_batch + 1) > max_batch
            assert full or now - batch[0].arrived >= delay
            sent.append(batch)
    sent += q.take_ready(now + 1.0)
    ids = [p.entry_id for b in sent for p in b]
    assert len(ids) == len(set(ids)) == len(arrivals)  # none lost, none twice
    assert ids == sorted(ids, key=lambda x: int(x.split(b"-")[0]))  # FIFO


def test_full_batch_leaves_at_once_and_partial_waits() -> None:
    q = ModelQueue(4, 0.002)
    for i in range(5):
        q.add(_pending(i, 1, 0.0))
    first = q.take_ready(0.0)
    assert [len(b) for b in first] == [4]
    assert q.take_ready(0.001) == []
    assert q.next_due() == 0.002
    assert [len(b) for b in q.take_ready(0.002)] == [1]


def test_unbatched_models_send_each_request_alone() -> None:
    q = ModelQueue(0, 0.01)
    for i in range(3):
        q.add(_pending(i, 1, 0.0))
    assert [len(b) for b in q.take_ready(0.0)] == [1, 1, 1]


def test_drain_sends_partial_batches() -> None:
    q = ModelQueue(8, 10.0)
    q.add(_pending(0, 3, 0.0))
    assert q.take_ready(0.0) == []
    assert [len(b) for b in q.take_ready(0.0, drain=True)] == [1]


def test_requeued_batch_goes_out_first_and_in_order() -> None:
    q = ModelQueue(2, 0.0)
    for i in range(5):
        q.add(_pending(i, 1, 0.0))
    first, second, third = q.take_ready(0.0)
    q.requeue(third)
    q.requeue(second)
    again = q.take_ready(0.0)
    assert [[p.entry_id for p in b] for b in again] == [[b"2-0", b"3-0"], [b"4-0"]]
    assert [p.entry_id for p in first] == [b"0-0", b"1-0"]
