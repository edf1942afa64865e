"""The broker process: read requests from every model's stream, schedule them, hand batches to pools.

Three tasks share the in-memory schedulers (one event loop, so no locks):

* the *reader* blocks in ``XREADGROUP`` over all request streams and adds
  what it reads (requests, cancellations) to the schedulers;
* the *dispatcher* hands out batches whenever a pool has room and a
  scheduler has a batch ready, and rejects requests that can no longer make
  their deadline.  It sleeps on the event loop's clock, because Redis only
  wakes blocked clients on its ``hz`` tick (100 ms by default), far too
  coarse for batching;
* the *listener* hears workers announce finished batches (pub/sub), which
  frees room in their pool and teaches the model's latency model;
* the *reclaimer* keeps this broker registered in ``keys.BROKERS`` and takes
  over the request entries of brokers that died before acknowledging them
  (broker.reclaim), so several brokers can run and any may be killed.

Each batch goes to one of the pools its model may run on (broker.pools.route:
the cheapest with a live worker and room that can start it in time).

A pool has room while fewer than ``pool_depth`` batches per live worker that
this broker dispatched are unfinished.  They are tracked by entry id, not
counted, because a done notice (pub/sub connection) may overtake the reply
to the XADD that created its entry (write connection); ids are removed by
their done notice, and while a pool has no room the broker checks every
RESYNC_S that its unfinished entries still exist, in case a notice was lost.
Requests beyond the room wait here, where they can still join a bigger
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

Around this module: broker.served builds the per-model state the tasks share (and turns a
request group into the scheduler's requests), broker.pool_loss handles pools that have lost
every worker (rejecting, moving stranded batches, raising wake-up signals), broker.pools routes
batches, broker.scheduler forms them, broker.reclaim takes over dead brokers' entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

from broker import keys, scripts
from broker.handoff import HANDED, Acks, HandedBatch, Handoff, Settled, Settling, ack_commands
from broker.liveness import LiveWorkers
from broker.messages import Member, Stat, batch_fields, encode_reply, parse_cancel, parse_done, parse_group
from broker.pool_loss import PoolLoss
from broker.pools import Choice, Pool, fastest, least_loaded, route
from broker.reclaim import (
    FORGET_EVERY,
    ORPHAN_IDLE_MS,
    RECLAIM_S,
    claim_forgotten,
    claim_orphans,
    forget_dead_consumers,
    live_members,
)
from broker.scheduler import Entry, Rejection, Request
from broker.served import Served, group_requests, release, serve, wall_ns
from ferry import metrics
from ferry.errors import Code
from ferry.lifecycle import Wakeup, cancel_all
from ferry.redis_conn import REDIS_DOWN, connect, ensure_group
from ferry.repository import Repository
from ferry.resp import DataClient, RespError, listen, range_entries, stream_entries
from ferry.resp_cluster import data_client, stream_groups, subscriber_urls
from ferry.settings import BrokerSettings
from ferry.tracing import Tracing

log = logging.getLogger("ferry.broker")

IDLE_BLOCK_MS = 200  # how often an idle reader looks at its stop flag
TIMER_SLACK_S = 0.0005
RESYNC_S = 0.05  # a full pool's unfinished entries are checked this often, in case a done notice was lost


class Broker:
    def __init__(self, settings: BrokerSettings, repo: Repository, handoff: Handoff | None = None) -> None:
        self.settings = settings
        self.repo = repo
        # The worker in this process, if any (broker.handoff): its pool's batches go to it directly.
        self.handoff = handoff
        if handoff is not None:
            handoff.attach(self._handed_finished, self._handed_ran, self._handed_confirmed, self._handed_lost)
        self._handed_seq = 0
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        self._reads = data_client(settings.redis_url, settings.redis_timeout_s + IDLE_BLOCK_MS / 1000)
        self._writes = data_client(settings.redis_url, settings.redis_timeout_s)
        self.live = LiveWorkers(self._writes, settings.redis_url)
        self._stopping = asyncio.Event()
        self._kick = Wakeup()
        self._models, self._pools = serve(settings, repo)
        self._by_key = {model.mv.key: model for model in self._models.values()}
        self._turn = 0  # round-robin start among models
        self._by_channel = {keys.done_channel(p.name).encode(): p for p in self._pools.values()}
        for model in self._models.values():
            metrics.PENDING.labels(*model.labels).set_function(functools.partial(_pending, model))
        for name in self._pools:
            metrics.LIVE_WORKERS.labels(name).set_function(functools.partial(_live, self.live, name))
        self._rtt = metrics.REDIS_RTT.labels("broker")
        self.tracing = Tracing("ferry-broker", settings.otlp_endpoint, settings.trace_sample_ratio, settings.broker_id)
        self._model_list = list(self._models.values())
        self.pool_loss = PoolLoss(self._models, self._pools, self._writes, self._workers, self._room,
                                  settings.no_worker_grace_s)
        self._tasks: list[asyncio.Task[None]] = []
        self.batches_sent = 0
        self.rejected = 0
        self.cancelled = 0

    def stop(self) -> None:
        self._stopping.set()

    async def setup(self) -> None:
        for model in self._models.values():
            await ensure_group(self.redis, model.stream, keys.BROKER_GROUP)
        for pool in self._pools.values():
            await ensure_group(self.redis, pool.stream, keys.WORKER_GROUP)
        await scripts.load_all(self._writes)

    async def run(self) -> None:
        await self.setup()
        await self.live.refresh()
        self.live.start()
        log.info("broker %s serving %d model version(s), %s batching", self.settings.broker_id,
                 len(self._models), self.settings.batch_window)
        self._tasks = [
            asyncio.create_task(self._dispatcher(), name="dispatcher"),
            asyncio.create_task(self._listener(), name="listener"),
            asyncio.create_task(self._reclaimer(), name="reclaimer"),
        ]
        try:
            await self._reader()
        finally:
            await cancel_all(self._tasks)
            await self.live.close()
            with contextlib.suppress(*REDIS_DOWN, RespError):
                # On the connection its heartbeats used: after a failover, the same primary.
                await self._writes.execute([["ZREM", keys.BROKERS, self.settings.broker_id]])
            # Graceful stop: what was read goes out now rather than waiting for a reclaim.
            try:
                await self._dispatch(time.monotonic(), drain=True)
            except REDIS_DOWN as exc:
                log.error("could not hand over queued requests on shutdown: %s", exc)
            await self.redis.aclose()
            await self._reads.close()
            await self._writes.close()
            self.tracing.shutdown()
            log.info("broker %s stopped after %d batches (%d requests rejected, %d cancelled)",
                     self.settings.broker_id, self.batches_sent, self.rejected, self.cancelled)

    # --- reading ----------------------------------------------------------------------

    async def _reader(self) -> None:
        # One blocking read covers every model's stream; on a Redis Cluster, one per slot
        # (a command's keys must share one), each on a connection of its own.
        groups = stream_groups(self._reads, list(self._models))
        if len(groups) == 1:
            await self._read_loop(self._reads, groups[0])
            return
        clients = [data_client(self.settings.redis_url, self._reads.timeout_s) for _ in groups]
        tasks = [asyncio.create_task(self._read_loop(c, g), name=f"reader-{i}")
                 for i, (c, g) in enumerate(zip(clients, groups, strict=True))]
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_all(tasks)
            for c in clients:
                await c.close()

    async def _read_loop(self, client: DataClient, streams: list[bytes | str]) -> None:
        read: list[bytes | str | int] = [
            "XREADGROUP", "GROUP", keys.BROKER_GROUP, self.settings.broker_id,
            "COUNT", self.settings.read_count, "BLOCK", IDLE_BLOCK_MS, "STREAMS",
            *streams, *([">"] * len(streams)),
        ]
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                resp = stream_entries(await client.call(*read))
                if resp:
                    self._take_in(resp)
                    self._kick.set()
                    # Let the dispatcher send what this read made ready before the read is re-armed:
                    # re-arming first put a Redis round of its own ahead of the batch.
                    await asyncio.sleep(0)
                    if self.handoff is not None and self.handoff.waiting():
                        # ...and let this process's worker run what it was handed and send the
                        # replies: the client waits for those, while a read re-armed now could
                        # only be answered after them (the loop computes inline).
                        await asyncio.sleep(0)
                backoff = 0.05
            except REDIS_DOWN as exc:
                log.warning("redis unreachable (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except RespError as exc:
                if not exc.group_lost:
                    raise
                # Redis lost its data (restart without persistence, FLUSHALL): recreate.
                log.warning("consumer groups are gone (%s); recreating them", exc)
                await self.setup()

    def _take_in(self, resp: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], *,
                 taken_over: bool = False) -> None:
        now = time.monotonic()
        wall = time.time_ns()
        for stream, entries in resp:
            model = self._models[stream]
            levels = max(1, model.mv.settings.priority_levels)
            ahead = least_loaded(model.options, self._workers)
            self._use_fastest(model)
            for entry_id, fields in entries:
                model.held.add(entry_id)
                cancel = parse_cancel(fields)
                if cancel is not None:
                    gateway, corrs = cancel
                    for corr in corrs:
                        req = model.sched.cancel(gateway, corr)
                        if req is not None:
                            self.cancelled += 1
                            release(model, req)
                    model.done.append(Entry(entry_id, 0, 0))
                    continue
                g = parse_group(fields)
                model.sched.note_holding(g.gateway, g.holding, now)
                add = model.sched.add
                for req in group_requests(g, entry_id, now, wall, levels, taken_over=taken_over):
                    add(req, ahead)

    async def _reclaimer(self) -> None:
        me = self.settings.broker_id
        passes = 0
        while True:
            try:
                now_ms = int(time.time() * 1000)
                await self._writes.execute([["ZADD", keys.BROKERS, now_ms + keys.HEARTBEAT_TTL_MS, me],
                                            ["ZREMRANGEBYSCORE", keys.BROKERS, "-inf", now_ms]])
                live = await live_members(self._writes, keys.BROKERS)
                live.add(me.encode())
                for stream, model in self._models.items():
                    claimed = await claim_orphans(self._writes, model.stream, keys.BROKER_GROUP, me, live,
                                                  ORPHAN_IDLE_MS)
                    forgotten = await claim_forgotten(self._writes, model.stream, keys.BROKER_GROUP, me, model.held)
                    if claimed or forgotten:
                        metrics.TAKEN_OVER.labels("broker").inc(len(claimed) + len(forgotten))
                        log.warning("took over %d request entr(ies) of %s from dead brokers, and %d of its own "
                                    "that Redis brought back (lost writes)", len(claimed), model.mv.name,
                                    len(forgotten))
                        self._take_in([(stream, [(c.entry_id, c.fields) for c in claimed + forgotten])],
                                      taken_over=True)
                        self._kick.set()
                    if passes % FORGET_EVERY == FORGET_EVERY - 1:
                        await forget_dead_consumers(self._writes, model.stream, keys.BROKER_GROUP, live,
                                                    ORPHAN_IDLE_MS)
                await self._sample_pools()
            except REDIS_DOWN as exc:
                log.warning("broker registry: redis unreachable (%s)", exc)
            except RespError as exc:
                if not exc.group_lost:
                    log.exception("reclaiming dead brokers' requests failed; trying again")
            except Exception:
                log.exception("reclaiming dead brokers' requests failed; trying again")
            passes += 1
            await asyncio.sleep(RECLAIM_S)

    async def _sample_pools(self) -> None:
        """Backlog and oldest entry's age of every pool stream, for the metrics."""
        pools = list(self._pools.values())
        commands: list[list[bytes | str | int]] = []
        for pool in pools:
            commands += [["XLEN", pool.stream], ["XRANGE", pool.stream, "-", "+", "COUNT", 1]]
        replies = await self._writes.execute(commands)
        now_ms = time.time() * 1000
        for i, pool in enumerate(pools):
            metrics.BACKLOG.labels(pool.name).set(int(replies[2 * i]))
            first = range_entries(replies[2 * i + 1])
            age = (now_ms - int(first[0][0].split(b"-")[0])) / 1000 if first else 0.0
            metrics.OLDEST_AGE.labels(pool.name).set(max(0.0, age))

    # --- completions --------------------------------------------------------------------

    async def _listener(self) -> None:
        channels = [keys.done_channel(p) for p in self._pools]
        urls = subscriber_urls(self.settings.redis_url)
        for attempt in itertools.count():
            try:
                await listen(urls[attempt % len(urls)], self.settings.redis_timeout_s, channels, self._on_notice)
            except REDIS_DOWN as exc:
                log.warning("done-notice listener: redis unreachable (%s); retrying", exc)
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("done-notice listener failed; retrying")
                await asyncio.sleep(0.5)

    def _on_notice(self, channel: bytes, data: bytes) -> None:
        # Called from the subscription's protocol: an exception here would close it.
        try:
            self._on_done(channel, data)
        except Exception:
            log.exception("could not handle done notice %r", data[:200])

    def _on_done(self, channel: bytes, data: bytes) -> None:
        now = time.monotonic()
        model_name, version, rows, compute_ns, ids = parse_done(data)
        pool = self._by_channel.get(channel)
        if pool is None:
            return
        self._finished(pool, self._by_key.get((model_name, version)), ids, rows, compute_ns, now)

    def _finished(self, pool: Pool, model: Served | None, ids: list[bytes], rows: int, compute_ns: int,
                  now: float, *, late_kick: bool = False) -> None:
        """Batches ``ids`` of ``pool`` are done: room in the pool, and what the model's latency model learns."""
        sent = [t for i in ids if (t := pool.finished(i, now)) is not None]
        lat = model.latency_on(pool.name) if model is not None else None
        if model is not None and lat is not None and rows > 0:
            model.sched.observe_done(rows, now)
            compute = compute_ns / 1e9
            lat.observe(rows, compute)
            if sent:
                lat.observe_overhead(now - min(t for t, _ in sent) - compute)
                pool.observe_hop(max(0.0, now - min(start for _, start in sent) - compute))
        # The room it freed matters only to queued requests: with none, a dispatch round would find
        # nothing to do (at low load, one wasted round per request).
        if any(m.sched.live for m in self._model_list):
            if late_kick:
                asyncio.get_running_loop().call_soon(self._kick.set)
            else:
                self._kick.set()

    # --- batches handed to the worker in this process (broker.handoff) -----------------------

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
                        self._workers(pool.name), model.stream.encode())
        handoff.hand(HandedBatch(batch_id, model.mv.name, model.mv.version, members, trace, batch))
        self.batches_sent += 1
        self._count([(model, pool, batch)], [])
        return True

    def _handed_finished(self, batch: HandedBatch) -> Settled:
        model = self._by_key[(batch.model, batch.version)]
        settling = Settling(replies=True)
        for r in batch.requests:
            settling.settle(model, r)
        settling.seal()
        commands = ack_commands(settling.ready, keys.BROKER_GROUP, scripts.ACK_REQUESTS_SHA)
        return Settled(commands, settling, settling.ready)

    def _handed_ran(self, batch: HandedBatch, rows: int, compute_ns: int) -> None:
        assert self.handoff is not None
        self._finished(self._pools[self.handoff.pool], self._by_key[(batch.model, batch.version)], [batch.batch_id],
                       rows, compute_ns, time.monotonic(), late_kick=True)

    def _handed_confirmed(self, settled: Settled) -> Settled | None:
        """The worker's pipeline is confirmed: the entries it acknowledged are gone; the ones it waited
        for may now be acknowledged, by a follow-up on the same connection."""
        for acks, entry in settled.acked:
            acks.held.discard(entry.entry_id)
        ready = settled.settling.finish()
        if not ready:
            return None
        return Settled(ack_commands(ready, keys.BROKER_GROUP, scripts.ACK_REQUESTS_SHA), Settling(replies=True), ready)

    @staticmethod
    def _handed_lost(settled: Settled) -> None:
        """The worker could not write a handed batch's replies (a bug): once not held, its request
        entries are taken back by broker.reclaim.claim_forgotten and run again."""
        entries: list[tuple[Acks, Entry]] = [*settled.acked, *settled.settling.waiting]
        settled.settling.finish()
        for acks, entry in entries:
            if entry.remaining == 0:
                acks.held.discard(entry.entry_id)

    # --- dispatching ---------------------------------------------------------------------

    async def _dispatcher(self) -> None:
        while True:
            self._kick.clear()
            now = time.monotonic()
            try:
                await self._dispatch(now + TIMER_SLACK_S, drain=False)
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
            wait = self._next_wake(time.monotonic())
            if wait > 0:
                await self._kick.wait(wait)
            else:
                await asyncio.sleep(0)  # a round that handed batches in-process awaited nothing

    def _workers(self, pool: str) -> int:
        return self.live.pools[pool]

    def _room(self, pool: Pool) -> int:
        return max(1, self.live.pools[pool.name]) * self.settings.pool_depth - len(pool.unfinished)

    def _use_fastest(self, model: Served) -> None:
        """Deadline checks use the live pool that serves this model soonest: a request is
        hopeless only if no pool could make it."""
        best = fastest(model.options, self._workers)
        if best is not None:
            model.sched.latency = best

    def _route(self, model: Served, now: float, room: Callable[[Pool], float],
               formed: dict[str, list[float]]) -> Choice | None:
        return route(model.options, workers=self._workers, room=room,
                     formed=lambda p: formed.get(p.name, ()), now=now, urgent=model.sched.next_check())

    def _next_wake(self, now: float) -> float:
        wake = now + IDLE_BLOCK_MS / 1000
        for pool in self._pools.values():
            if self._room(pool) <= 0 and pool.on_stream():
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
            choice = self._route(model, now, self._room, {})
            if choice is not None:
                sched.latency = choice.latency
                if (closes := sched.window_closes(sched.hold_for(choice.release_at))) is not None:
                    wake = min(wake, closes)
        return max(0.0, wake - now)

    async def _dispatch(self, now: float, *, drain: bool) -> None:
        await self.pool_loss.rescue(now)
        commands: list[list[bytes | str | int]] = []
        sent: list[tuple[Served, Pool, list[Request]]] = []
        rejections: list[tuple[Served, Rejection]] = []
        settling = Settling()  # the request entries this round's writes handle requests of
        for model in self._model_list:
            self._use_fastest(model)
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
                 if pool.unfinished and self._room(pool) <= 0 and now - pool.checked >= RESYNC_S]
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
            self._kick.set()
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
            pool.dispatched(entry_id, sent_at, rows, compute, self._workers(pool.name), model.stream.encode())
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
            self._kick.set()

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
            return math.inf if drain else self._room(pool) - used[pool.name]

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


def _pending(model: Served) -> float:
    return float(model.sched.live)


def _live(live: LiveWorkers, pool: str) -> float:
    return float(live.pools[pool])
