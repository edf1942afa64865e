"""broker.handoff.Settling: a request entry is acknowledged only by a write issued after every other
write that handled one of its requests is confirmed (broker rounds and the colocated worker's
replies travel on different connections, and Redis may run them in either order)."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.handoff import Settling, ack_commands
from broker.requests import Entry, Request


@dataclass(eq=False)
class _Model:
    stream: str = "ferry:{m:m}:v1:requests"
    counter: str = "ferry:{m:m}:v1:queued"
    done: list[Entry] = field(default_factory=list)
    held: set[bytes] = field(default_factory=set)


def _requests(entry: Entry) -> list[Request]:
    return [Request(entry, "gw", i, 1, 0, 0.0, float("inf"), float("inf"), 0, "") for i in range(entry.count)]


def test_a_write_that_handles_every_request_of_an_entry_acknowledges_it() -> None:
    model, entry = _Model(), Entry(b"1-1", 2, 2)
    w = Settling()
    for r in _requests(entry):
        w.settle(model, r)
    w.seal()
    assert w.ready == [(model, entry)] and w.waiting == []
    assert ack_commands(w.ready, "brokers", "sha") == [
        ["EVALSHA", "sha", 2, model.stream, model.counter, "brokers", 2, b"1-1"]]


def test_an_entry_split_over_two_writes_waits_for_both_to_be_confirmed() -> None:
    model, entry = _Model(), Entry(b"1-1", 2, 2)
    first, second = _requests(entry)
    broker_round, replies = Settling(), Settling(replies=True)
    broker_round.settle(model, first)
    broker_round.seal()
    assert broker_round.ready == [] and entry.settling == 1  # half handled: nothing to acknowledge
    replies.settle(model, second)
    replies.seal()
    # All handled, but the round that handled the first may still be on its way: not yet.
    assert replies.ready == [] and entry.settling == 2
    assert broker_round.finish() == []  # the replies are still unconfirmed
    assert replies.finish() == [(model, entry)]  # the last confirmation: acknowledge next
    assert entry.settling == 0


def test_an_entry_split_over_two_handed_batches_is_acknowledged_by_the_second_replies() -> None:
    """Both on the worker's connection, which Redis reads in order: no need to wait."""
    model, entry = _Model(), Entry(b"1-1", 2, 2)
    first, second = _requests(entry)
    one, two = Settling(replies=True), Settling(replies=True)
    one.settle(model, first)
    one.seal()
    two.settle(model, second)
    two.seal()
    assert two.ready == [(model, entry)]
    assert one.finish() == [] and two.finish() == []  # acknowledged once, not again
    assert entry.settling == 0 and entry.settling_replies == 0


def test_a_failed_round_hands_its_requests_back_and_never_acknowledges_them() -> None:
    model, entry = _Model(), Entry(b"1-1", 2, 2)
    first, second = _requests(entry)
    replies = Settling(replies=True)
    replies.settle(model, second)
    replies.seal()
    broker_round = Settling()
    broker_round.settle(model, first)
    broker_round.seal()
    broker_round.unsettle(first)  # the round failed: `first` is queued again
    assert broker_round.finish() == [] and replies.finish() == []  # one request is still to handle
    assert entry.remaining == 1 and entry.settling == 0
    again = Settling()
    again.settle(model, first)
    again.seal()
    assert again.ready == [(model, entry)]


def test_acknowledgements_group_per_model_version() -> None:
    a, b = _Model(stream="sa", counter="ca"), _Model(stream="sb", counter="cb")
    entries = [(a, Entry(b"1-1", 3, 0)), (b, Entry(b"2-1", 1, 0)), (a, Entry(b"1-2", 2, 0))]
    assert ack_commands(entries, "g", "s") == [["EVALSHA", "s", 2, "sa", "ca", "g", 5, b"1-1", b"1-2"],
                                               ["EVALSHA", "s", 2, "sb", "cb", "g", 1, b"2-1"]]
