"""The broker process: read requests from every model's stream, schedule them, hand batches to pools.

Four tasks share the in-memory schedulers (one event loop, so no locks):

* the *reader* blocks in ``XREADGROUP`` over all request streams and adds
  what it reads (requests, cancellations) to the schedulers;
* the *dispatcher* (broker.dispatch) hands out batches whenever a pool has room
  and a scheduler has a batch ready, and rejects requests that can no longer make
  their deadline;
* the *listener* hears workers announce finished batches (pub/sub), which
  frees room in their pool and teaches the model's latency model;
* the *reclaimer* keeps this broker registered in ``keys.BROKERS`` and takes
  over the request entries of brokers that died before acknowledging them
  (broker.reclaim), so several brokers can run and any may be killed.

A batch handed to the worker in this process (``--colocated-worker``, broker.handoff) is
settled here when the worker has sent its replies, as a done notice settles one on a stream.

Around this module: broker.dispatch runs the dispatch rounds, broker.served builds the per-model
state the tasks share (and turns a request group into the scheduler's requests), broker.pool_loss
handles pools that have lost every worker (rejecting, moving stranded batches, raising wake-up
signals), broker.pools routes batches, broker.scheduler forms them, broker.reclaim takes over dead
brokers' entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time

from broker import cpu_load, keys, scripts
from broker.dispatch import Dispatcher
from broker.handoff import Acks, HandedBatch, Handoff, Settled, Settling, ack_commands
from broker.liveness import LiveWorkers
from broker.messages import parse_cancel, parse_done, parse_group
from broker.pools import Pool, least_loaded
from broker.reclaim import (
    FORGET_EVERY,
    ORPHAN_IDLE_MS,
    RECLAIM_S,
    claim_forgotten,
    claim_orphans,
    forget_dead_consumers,
    live_members,
)
from broker.requests import Entry
from broker.served import Served, group_requests, release, serve
from ferry import metrics
from ferry.lifecycle import cancel_all, settle_heap
from ferry.redis_conn import REDIS_DOWN, connect, ensure_group
from ferry.repository import Repository
from ferry.resp import DataClient, RespError, listen, range_entries, stream_entries
from ferry.resp_cluster import data_client, stream_groups, subscriber_urls
from ferry.settings import BrokerSettings
from ferry.tracing import Tracing

log = logging.getLogger("ferry.broker")

IDLE_BLOCK_MS = 200  # how often an idle reader (and dispatcher) looks at its stop flag


class Broker:
    def __init__(self, settings: BrokerSettings, repo: Repository, handoff: Handoff | None = None) -> None:
        self.settings = settings
        self.repo = repo
        # The worker in this process, if any (broker.handoff): its pool's batches go to it directly.
        self.handoff = handoff
        if handoff is not None:
            handoff.attach(self._handed_finished, self._handed_ran, self._handed_confirmed, self._handed_lost)
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        self._reads = data_client(settings.redis_url, settings.redis_timeout_s + IDLE_BLOCK_MS / 1000)
        self._writes = data_client(settings.redis_url, settings.redis_timeout_s)
        self.live = LiveWorkers(self._writes, settings.redis_url)
        self._stopping = asyncio.Event()
        self._models, self._pools = serve(settings, repo)
        self._by_key = {model.mv.key: model for model in self._models.values()}
        self._by_channel = {keys.done_channel(p.name).encode(): p for p in self._pools.values()}
        for model in self._models.values():
            metrics.PENDING.labels(*model.labels).set_function(functools.partial(_pending, model))
        for name in self._pools:
            metrics.LIVE_WORKERS.labels(name).set_function(functools.partial(_live, self.live, name))
        self.tracing = Tracing("ferry-broker", settings.otlp_endpoint, settings.trace_sample_ratio, settings.broker_id)
        self._model_list = list(self._models.values())
        # Only its own worker's batches can wait (scheduler.traffic): without one there is nothing to hold.
        self._can_hold = bool(settings.return_wait_us) and handoff is not None
        # Off until the CPUs are seen saturated (cpu_load.watch), unless asked for always.
        self._return_wait(settings.return_wait_always)
        self.dispatch = Dispatcher(settings, self._models, self._pools, self._writes, self.live, self.tracing,
                                   handoff, IDLE_BLOCK_MS / 1000)
        self._tasks: list[asyncio.Task[None]] = []
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
        settle_heap()
        log.info("broker %s serving %d model version(s), %s batching", self.settings.broker_id,
                 len(self._models), self.settings.batch_window)
        self._tasks = [
            asyncio.create_task(self.dispatch.run(), name="dispatcher"),
            asyncio.create_task(self._listener(), name="listener"),
            asyncio.create_task(self._reclaimer(), name="reclaimer"),
        ]
        if self._can_hold and not self.settings.return_wait_always:
            self._tasks.append(asyncio.create_task(cpu_load.watch(cpu_load.CpuLoad(), self._return_wait),
                                                   name="cpu-watch"))
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
                await self.dispatch.round(time.monotonic(), drain=True)
            except REDIS_DOWN as exc:
                log.error("could not hand over queued requests on shutdown: %s", exc)
            await self.redis.aclose()
            await self._reads.close()
            await self._writes.close()
            self.tracing.shutdown()
            log.info("broker %s stopped after %d batches (%d requests rejected, %d cancelled)",
                     self.settings.broker_id, self.dispatch.batches_sent, self.dispatch.rejected, self.cancelled)

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
                    self.dispatch.kick.set()
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
            ahead = least_loaded(model.options, self.dispatch.workers)
            self.dispatch.use_fastest(model)
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
                model.sched.traffic.note_holding(g.gateway, g.holding, now)
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
                        self.dispatch.kick.set()
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

    def _return_wait(self, active: bool) -> None:
        """Hold for returning callers (return_wait_us) or not: cpu_load.watch decides."""
        for model in self._model_list:
            model.sched.traffic.return_wait_active = active
        metrics.RETURN_WAIT_ACTIVE.set(1 if active and self._can_hold else 0)

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
                  now: float, *, late_kick: bool = False, replied_ns: int = 0) -> None:
        """Batches ``ids`` of ``pool`` are done: room in the pool, and what the model's latency model learns."""
        sent = [t for i in ids if (t := pool.finished(i, now)) is not None]
        lat = model.latency_on(pool.name) if model is not None else None
        if model is not None and lat is not None and rows > 0:
            model.sched.traffic.finished(rows, now, replied_ns)
            compute = compute_ns / 1e9
            lat.observe(rows, compute)
            if sent:
                lat.observe_overhead(now - min(t for t, _ in sent) - compute)
                pool.observe_hop(max(0.0, now - min(start for _, start in sent) - compute))
        # The room it freed matters only to queued requests: with none, a dispatch round would find
        # nothing to do (at low load, one wasted round per request).
        if any(m.sched.live for m in self._model_list):
            if late_kick:
                asyncio.get_running_loop().call_soon(self.dispatch.kick.set)
            else:
                self.dispatch.kick.set()

    # --- batches handed to the worker in this process (broker.handoff) -----------------------

    def _handed_finished(self, batch: HandedBatch) -> Settled:
        batch.replied_ns = time.time_ns()
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
                       rows, compute_ns, time.monotonic(), late_kick=True, replied_ns=batch.replied_ns)

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

def _pending(model: Served) -> float:
    return float(model.sched.live)


def _live(live: LiveWorkers, pool: str) -> float:
    return float(live.pools[pool])
