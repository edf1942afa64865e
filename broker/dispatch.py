"""Dispatch rounds: batches out of the model schedulers and onto pools.

The broker's *dispatcher* task (``Dispatcher.run``) hands out batches whenever a pool has room and
a scheduler has a batch ready, and rejects requests that can no longer make their deadline.  It
sleeps on the event loop's clock, because Redis only wakes blocked clients on its ``hz`` tick
(100 ms by default), far too coarse for batching.  Each batch goes to one of the pools its model
may run on (broker.pools.route: the cheapest with a live worker and room that can start it in
time); pools that lost every worker are broker.pool_loss's.

A pool has room while fewer than ``pool_depth`` batches per live worker that
this broker dispatched are unfinished.  They are tracked by entry id, not
counted, because a done notice (pub/sub connection) may overtake the reply
to the XADD that created its entry (write connection); ids are removed by
their done notice (broker.service), and while a pool has no room the dispatcher checks every
RESYNC_S that its unfinished entries still exist, in case a notice was lost.
Requests beyond the room wait in the broker, where they can still join a bigger
batch, be overtaken by a higher priority, be cancelled, or be rejected
before their deadline.

A dispatch round goes out in one pipelined round trip: XADD of the batches,
then per model scripts.ACK_REQUESTS for the entries that are fully handled,
and the rejections' replies.  The batches are written before their requests
are acknowledged, so a broker that dies in between leaves them pending, not
lost.

A broker that runs its pool's worker in its own process (``--colocated-worker``)
hands that pool's batches over in-process instead (broker.handoff): no batch
entry, no done notice, and the worker's replies acknowledge the requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

from broker import keys, scripts
from broker.handoff import HANDED, HandedBatch, Handoff, Settling, ack_commands
from broker.liveness import LiveWorkers
from broker.messages import Member, Stat, batch_fields, encode_reply
from broker.pool_loss import PoolLoss
from broker.pools import Choice, Pool, fastest, route
from broker.requests import Rejection, Request
from broker.served import Served, release, wall_ns
from ferry import metrics
from ferry.errors import Code
from ferry.lifecycle import Wakeup
from ferry.redis_conn import REDIS_DOWN
from ferry.resp import DataClient, RespError
from ferry.settings import BrokerSettings
from ferry.tracing import Tracing

log = logging.getLogger("ferry.broker")

TIMER_SLACK_S = 0.0005
RESYNC_S = 0.05  # a full pool's unfinished entries are checked this often, in case a done notice was lost


class Dispatcher:
    def __init__(self, settings: BrokerSettings, models: dict[bytes, Served], pools: dict[str, Pool],
                 writes: DataClient, live: LiveWorkers, tracing: Tracing, handoff: Handoff | None,
                 idle_s: float) -> None:
        self.settings = settings
        self._model_list = list(models.values())
        self._pools = pools
        self._writes = writes
        self.live = live
        self.tracing = tracing
        # The worker in this process, if any (broker.handoff): its pool's batches go to it directly.
        self.handoff = handoff
        self._idle_s = idle_s  # longest sleep with nothing to do
        self.kick = Wakeup()  # set by whatever may make a batch ready: arrivals, room in a pool
        self.pool_loss = PoolLoss(models, pools, writes, self.workers, self.room, settings.no_worker_grace_s)
        self._turn = 0  # round-robin start among models
        self._handed_seq = 0
        self._rtt = metrics.REDIS_RTT.labels("broker")
        self.batches_sent = 0
        self.rejected = 0

    async def run(self) -> None:
        while True:
            self.kick.clear()
            now = time.monotonic()
            try:
                await self.round(now + TIMER_SLACK_S, drain=False)
            except REDIS_DOWN as exc:
                log.warning("redis unreachable dispatching (%s)", exc)
                await asyncio.sleep(0.05)
                continue
            except RespError as exc:
                if "NOSCRIPT" in str(exc):
                    await scripts.load_all(self._writes)
                    continue
                log.exception("dispatching failed; retrying")
                await asyncio.sleep(0.5)
                continue
            except Exception:
                # A bug or an unexpected Redis answer must not stop batching for good.
                log.exception("dispatching failed; retrying")
                await asyncio.sleep(0.5)
                continue
            wait = self.next_wake(time.monotonic())
            if wait > 0:
                await self.kick.wait(wait)
            else:
                await asyncio.sleep(0)  # a round that handed batches in-process awaited nothing

    def workers(self, pool: str) -> int:
        return self.live.pools[pool]

    def room(self, pool: Pool) -> int:
        return max(1, self.live.pools[pool.name]) * self.settings.pool_depth - len(pool.unfinished)

    def use_fastest(self, model: Served) -> None:
        """Deadline checks use the live pool that serves this model soonest: a request is
        hopeless only if no pool could make it."""
        best = fastest(model.options, self.workers)
        if best is not None:
            model.sched.latency = best

    def _route(self, model: Served, now: float, room: Callable[[Pool], float],
               formed: dict[str, list[float]]) -> Choice | None:
        return route(model.options, workers=self.workers, room=room,
                     formed=lambda p: formed.get(p.name, ()), now=now, urgent=model.sched.next_check())

    def next_wake(self, now: float) -> float:
        wake = now + self._idle_s
        for pool in self._pools.values():
            if self.room(pool) <= 0 and pool.on_stream():
                wake = min(wake, pool.checked + RESYNC_S)  # waiting for room: check for lost notices
        for model in self._model_list:
            sched = model.sched
            if not sched.live:
                continue
            check = sched.next_check()
            if check is not None:
                wake = min(wake, check)
            if model.unserved_since is not None:
                wake = min(wake, model.unserved_since + self.pool_loss.grace_s)
            choice = self._route(model, now, self.room, {})
            if choice is not None:
                sched.latency = choice.latency
                if (closes := sched.window_closes(sched.hold_for(choice.release_at))) is not None:
                    wake = min(wake, closes)
        return max(0.0, wake - now)

    async def round(self, now: float, *, drain: bool) -> None:
        await self.pool_loss.rescue(now)
        commands: list[list[bytes | str | int]] = []
        sent: list[tuple[Served, Pool, list[Request]]] = []
        rejections: list[tuple[Served, Rejection]] = []
        settling = Settling()  # the request entries this round's writes handle requests of
        for model in self._model_list:
            self.use_fastest(model)
            for rej in model.sched.expire(now):
                rejections.append((model, rej))
                release(model, rej.request, settling)
            rejections += self.pool_loss.unserved(model, now, drain, settling)
        for model, pool, batch in self._form(now, drain):
            members = [Member(r.gateway, r.corr, r.rows, r.enqueued_ns,
                              wall_ns(r.deadline, now), r.payload, r.trace) for r in batch]
            trace = ""
            if self.tracing.enabled:
                trace = self.tracing.broker_spans(
                    [(r.trace, r.enqueued_ns) for r in batch], time.time_ns(),
                    {"ferry.model": model.mv.name, "ferry.pool": pool.name, "ferry.rows": sum(r.rows for r in batch),
                     "ferry.requests": len(batch)})
            if self._hand(model, pool, batch, members, trace):
                continue  # settled by the worker's replies, not by this round
            xadd: list[bytes | str | int] = ["XADD", pool.stream, "*"]
            for f, v in batch_fields(model.mv.name, model.mv.version, batch[0].shape, members, trace=trace).items():
                xadd += (f, v)
            commands.append(xadd)
            sent.append((model, pool, batch))
            for r in batch:
                release(model, r, settling)
        settling.seal()
        for owner, entry in settling.ready:
            owner.done.append(entry)
        commands += self.pool_loss.wake_commands(now)
        check = [pool for pool in self._pools.values()
                 if pool.unfinished and self.room(pool) <= 0 and now - pool.checked >= RESYNC_S]
        # Taken now: a handed batch's replies may settle more entries while this round is out.
        taken = [(model, model.done) for model in self._model_list if model.done]
        for model, _ in taken:
            model.done = []
        commands += ack_commands([(model, e) for model, done in taken for e in done], keys.BROKER_GROUP,
                                 scripts.ACK_REQUESTS_SHA)
        commands += self._rejection_commands(rejections)
        # Entries still in the stream are unfinished; the others' done notices were lost.
        checked = [(pool, entry_id) for pool in check for entry_id in pool.on_stream()]
        commands += [["XRANGE", pool.stream, entry_id, entry_id] for pool, entry_id in checked]
        if not commands:
            self._settled(settling)
            return
        try:
            round_start = time.perf_counter()
            replies = await self._writes.execute(commands)
            self._rtt.observe(time.perf_counter() - round_start)
        except BaseException:
            # Not handed over: back to the front of their queues, to go out on the next
            # attempt (a batch that did reach Redis is then sent twice, and the gateway
            # drops the second reply).  Acknowledgements wait for the next round.
            for model, done in taken:
                model.done[:0] = done
            for model, _, batch in reversed(sent):
                model.sched.requeue(batch)
                for r in batch:
                    settling.unsettle(r)
                    if r.entry.remaining == 1 and r.entry in model.done:
                        model.done.remove(r.entry)
            self._settled(settling)
            self.kick.set()
            raise
        for model, done in taken:
            model.held.difference_update(e.entry_id for e in done)
        self._settled(settling)
        self.batches_sent += len(sent)
        self.rejected += len(rejections)
        self._count(sent, rejections)
        sent_at = time.monotonic()
        for (model, pool, batch), entry_id in zip(sent, replies, strict=False):
            rows = sum(r.rows for r in batch)
            lat = model.latency_on(pool.name)
            compute = lat.compute(rows) if lat is not None else 0.0
            pool.dispatched(entry_id, sent_at, rows, compute, self.workers(pool.name), model.stream.encode())
        for pool in check:
            pool.checked = sent_at
        for (pool, entry_id), found in zip(checked, replies[len(replies) - len(checked):], strict=True):
            if not found and pool.lost(entry_id):
                log.warning("no done notice for batch %s of pool %s; counting it as finished",
                            entry_id.decode(), pool.name)

    def _settled(self, settling: Settling) -> None:
        """A round is over: entries it waited on whose other writes are confirmed go to the next round."""
        ready = settling.finish()
        for owner, entry in ready:
            owner.done.append(entry)
        if ready:
            self.kick.set()

    @staticmethod
    def _count(sent: list[tuple[Served, Pool, list[Request]]], rejections: list[tuple[Served, Rejection]]) -> None:
        wall = time.time_ns()
        for model, pool, batch in sent:
            metrics.BATCHES.labels(*model.labels, pool.name).inc()
            queue = metrics.QUEUE_DURATION.labels(*model.labels)
            for r in batch:
                queue.observe(max(0, wall - r.enqueued_ns) / 1e9)
        for model, rej in rejections:
            metrics.REJECTED.labels(*model.labels, Code(rej.code).name).inc()

    def _form(self, now: float, drain: bool) -> list[tuple[Served, Pool, list[Request]]]:
        """This round's batches: models take turns; each batch goes to the pool ``route`` picks."""
        out: list[tuple[Served, Pool, list[Request]]] = []
        formed: dict[str, list[float]] = defaultdict(list)
        used: dict[str, int] = defaultdict(int)

        def room(pool: Pool) -> float:
            return math.inf if drain else self.room(pool) - used[pool.name]

        models = self._model_list
        n = len(models)
        progress = True
        while progress:
            progress = False
            for i in range(n):
                model = models[(self._turn + i) % n]
                if not model.sched.live:
                    continue
                choice = self._route(model, now, room, formed)
                if choice is None:
                    if not drain:
                        continue
                    # Stopping: hand everything over, to the cheapest pool if none is live.
                    pool, latency = model.options[0]
                    choice = Choice(pool, latency, -math.inf)
                model.sched.latency = choice.latency
                hold = 0.0 if drain else model.sched.hold_for(choice.release_at)
                batch = model.sched.take(now, drain=drain, hold_s=hold)
                if batch:
                    out.append((model, choice.pool, batch))
                    used[choice.pool.name] += 1
                    formed[choice.pool.name].append(choice.latency.compute(sum(r.rows for r in batch)))
                    progress = True
        self._turn += 1
        return out

    def _rejection_commands(self, rejections: list[tuple[Served, Rejection]]) -> list[list[bytes | str | int]]:
        if not rejections:
            return []
        fails: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        wall = time.time_ns()
        for model, rej in rejections:
            f = fails[keys.stats_hash(model.mv.name, model.mv.version)]
            f[0] += 1
            f[1] += max(0, wall - rej.request.enqueued_ns)
        commands = scripts.push_reply_commands(
            (rej.request.gateway, encode_reply(rej.request.corr, rej.code, rej.message.encode()))
            for _, rej in rejections
        )
        for key, (count, ns) in fails.items():
            commands += [["HINCRBY", key, Stat.FAIL_COUNT, count], ["HINCRBY", key, Stat.FAIL_NS, ns]]
        return commands

    def _hand(self, model: Served, pool: Pool, batch: list[Request], members: list[Member], trace: str) -> bool:
        """Give ``batch`` to the worker in this process, if it runs ``pool`` and has room."""
        handoff = self.handoff
        if handoff is None or pool.name != handoff.pool or not handoff.has_room() or any(
                r.taken_over for r in batch):
            return False
        self._handed_seq += 1
        batch_id = HANDED + b"%d" % self._handed_seq
        rows = sum(r.rows for r in batch)
        lat = model.latency_on(pool.name)
        pool.dispatched(batch_id, time.monotonic(), rows, lat.compute(rows) if lat is not None else 0.0,
                        self.workers(pool.name), model.stream.encode())
        handoff.hand(HandedBatch(batch_id, model.mv.name, model.mv.version, members, trace, batch))
        self.batches_sent += 1
        self._count([(model, pool, batch)], [])
        return True
