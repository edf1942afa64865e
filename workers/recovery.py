"""What a worker does with batches it claimed from a dead worker of its pool.

A batch that was running when its worker died is usually innocent (the node
went away, the process was OOM-killed for other reasons): it runs again, as
it was.  A batch that was running in two dead workers probably holds a
*poison* request, one that kills whatever runs it; re-running it whole would
take down every worker of the pool in turn, forever.  So:

* failures = worker deaths this batch (or the batch it was split from) was
  running in: the ``f`` field it carries plus the deliveries XPENDING counted;
* a batch of several requests that failed ``SPLIT_AFTER`` times or more is
  split in two halves, each carrying the count, so the poison is isolated in
  log2(batch size) more deaths while the innocent half runs;
* a single request that failed ``max_attempts`` times is dead-lettered: its
  client gets INTERNAL, and the entry (with its payload, for inspection) goes
  to ``keys.dead_letters(pool)``, capped at ``keys.DEAD_LETTER_MAXLEN``.

Every decision is written in one pipeline, new entries before the old one is
acknowledged, so a worker that dies in between leaves the old entry pending
(to be claimed again) rather than lost; a request then may run twice, and the
gateway keeps the first answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import keys, scripts
from broker.messages import (
    F_WHY,
    batch_failures,
    batch_fields,
    batch_trace,
    done_notice,
    encode_reply,
    parse_batch,
)
from broker.reclaim import Claimed
from ferry.errors import Code

SPLIT_AFTER = 2

Command = list[bytes | str | int]


@dataclass
class Triage:
    run: list[Claimed] = field(default_factory=list)  # run as usual
    commands: list[Command] = field(default_factory=list)  # splits and dead letters, to write now
    split: int = 0
    dead: int = 0


def triage(claimed: list[Claimed], pool: str, max_attempts: int) -> Triage:
    out = Triage()
    stream = keys.pool_stream(pool)
    for c in claimed:
        model, version, shape, members = parse_batch(c.fields)
        failures = batch_failures(c.fields) + c.deliveries
        if len(members) == 1 and failures >= max_attempts:
            why = (f"request {members[0].corr} of model {model!r} v{version} was running every time a worker of "
                   f"pool {pool!r} died, {failures} times (max_attempts {max_attempts}): it was dead-lettered to "
                   f"{keys.dead_letters(pool)} instead of being retried; inspect it there with XRANGE")
            dead: Command = ["XADD", keys.dead_letters(pool), "MAXLEN", "~", keys.DEAD_LETTER_MAXLEN, "*"]
            for f, v in {**c.fields, F_WHY: why.encode()}.items():
                dead += (f, v)
            out.commands.append(dead)
            out.commands += scripts.push_reply_commands(
                [(members[0].gateway, encode_reply(members[0].corr, Code.INTERNAL, why.encode()))])
            out.dead += 1
        elif len(members) > 1 and failures >= min(SPLIT_AFTER, max_attempts):
            half = len(members) // 2
            for part in (members[:half], members[half:]):
                xadd: Command = ["XADD", stream, "*"]
                for f, v in batch_fields(model, version, shape, part, failures, batch_trace(c.fields)).items():
                    xadd += (f, v)
                out.commands.append(xadd)
            out.split += 1
        else:
            out.run.append(c)
            continue
        out.commands += [
            *scripts.settle_entries(stream, [c.entry_id]),
            # Frees the old entry's room in the broker that sent it (rows 0: nothing was learned).
            ["PUBLISH", keys.done_channel(pool), done_notice(model, version, 0, 0, [c.entry_id])],
        ]
    return out

