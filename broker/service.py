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
  frees room in their pool and teaches the model's latency model.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from broker import keys, scripts
from broker.liveness import LiveWorkers
from broker.messages import (
    GROUP_STRIDE,
    Member,
    Stat,
    batch_fields,
    encode_reply,
    parse_cancel,
    parse_done,
    parse_group,
)
from broker.scheduler import Entry, LatencyModel, ModelScheduler, Rejection, Request, worker_free_at
from ferry.errors import Code
from ferry.redis_conn import REDIS_DOWN, connect, ensure_group
from ferry.repository import ModelVersion, Repository
from ferry.resp import RespClient, RespError, stream_entries
from ferry.settings import BrokerSettings

log = logging.getLogger("ferry.broker")

IDLE_BLOCK_MS = 200  # how often an idle reader looks at its stop flag
TIMER_SLACK_S = 0.0005
RESYNC_S = 0.05  # a full pool's unfinished entries are checked this often, in case a done notice was lost
EARLY_MEMORY_S = 10.0  # done notices for entries not (yet) known here are remembered this long


@dataclass(eq=False)
class _Model:
    mv: ModelVersion
    stream: str
    counter: str
    pool: str
    sched: ModelScheduler
    done: list[Entry] = field(default_factory=list)  # entries to acknowledge in the next round


@dataclass(eq=False)
class _Pool:
    name: str
    stream: str
    models: list[_Model] = field(default_factory=list)
    turn: int = 0  # round-robin start among its models
    # entry id -> (dispatch time, rows, expected compute seconds, expected start), in dispatch order
    unfinished: dict[bytes, tuple[float, int, float, float]] = field(default_factory=dict)
    early: dict[bytes, float] = field(default_factory=dict)  # done before its XADD reply came
    checked: float = 0.0  # when the unfinished entries were last checked
    # Dispatch-to-done time beyond compute and waiting for a worker: the Redis hops and the
    # worker's own reading and replying.  An adaptive batch leaves this much before a worker frees.
    hop: float = 0.0

    def dispatched(self, entry_id: bytes, at: float, rows: int, compute: float, workers: int) -> None:
        if self.early.pop(entry_id, None) is None:
            start = max(at, self.free_at(workers, at, []))
            self.unfinished[entry_id] = (at, rows, compute, start)

    def free_at(self, workers: int, now: float, formed: list[float]) -> float:
        """When a worker is expected to be free for one more batch; ``formed``: the expected
        compute of batches formed this round and not yet sent."""
        return worker_free_at([(u[0], u[2]) for u in self.unfinished.values()], workers, now, formed)

    @property
    def rows_ahead(self) -> int:
        """Rows this broker handed to the pool that are not finished: queued work a new request waits behind."""
        return sum(u[1] for u in self.unfinished.values())

    def finished(self, entry_id: bytes, at: float) -> tuple[float, float] | None:
        """The entry's dispatch time and expected start, if this broker dispatched it and is still
        waiting for it."""
        sent = self.unfinished.pop(entry_id, None)
        if sent is None:
            self.early[entry_id] = at
            if len(self.early) > 1000:
                self.early = {k: t for k, t in self.early.items() if at - t < EARLY_MEMORY_S}
            return None
        return sent[0], sent[3]


class Broker:
    def __init__(self, settings: BrokerSettings, repo: Repository) -> None:
        self.settings = settings
        self.repo = repo
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        self._reads = RespClient(settings.redis_url, settings.redis_timeout_s + IDLE_BLOCK_MS / 1000)
        self._writes = RespClient(settings.redis_url, settings.redis_timeout_s)
        self.live = LiveWorkers(self.redis, settings.redis_url)
        self._stopping = asyncio.Event()
        self._kick = asyncio.Event()
        self._models: dict[bytes, _Model] = {}
        self._by_key: dict[tuple[str, int], _Model] = {}
        self._pools: dict[str, _Pool] = {}
        for mv in repo.all_versions():
            s = mv.settings
            window: float | None = None
            if settings.batch_window == "fixed":
                delay_us = settings.max_queue_delay_us if settings.max_queue_delay_us >= 0 else s.max_queue_delay_us
                window = delay_us / 1e6
            sched = ModelScheduler(
                f"model {mv.name!r} v{mv.version}",
                max_batch_size=s.max_batch_size,
                levels=max(1, s.priority_levels),
                delay_on_timeout=s.queue_policy.timeout_action == "DELAY",
                window_s=window,
                gather_s=settings.gather_us / 1e6,
                preferred=s.preferred_batch_sizes,
                static_sizes=s.static_batch_sizes,
                starvation_limit=settings.starvation_limit,
                latency=LatencyModel(),
            )
            model = _Model(mv, keys.request_stream(mv.name, mv.version), keys.queue_count(mv.name, mv.version),
                           s.pool, sched)
            self._models[model.stream.encode()] = model
            self._by_key[mv.key] = model
            pool = self._pools.setdefault(s.pool, _Pool(s.pool, keys.pool_stream(s.pool)))
            pool.models.append(model)
        self._by_channel = {keys.done_channel(p.name): p for p in self._pools.values()}
        self._sha_ack = scripts.sha(scripts.ACK_REQUESTS)
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
        ]
        try:
            await self._reader()
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.live.close()
            # Graceful stop: what was read goes out now rather than waiting for a reclaim.
            try:
                await self._dispatch(time.monotonic(), drain=True)
            except REDIS_DOWN as exc:
                log.error("could not hand over queued requests on shutdown: %s", exc)
            await self.redis.aclose()
            await self._reads.close()
            await self._writes.close()
            log.info("broker %s stopped after %d batches (%d requests rejected, %d cancelled)",
                     self.settings.broker_id, self.batches_sent, self.rejected, self.cancelled)

    # --- reading ----------------------------------------------------------------------

    async def _reader(self) -> None:
        streams = list(self._models)
        read: list[bytes | str | int] = [
            "XREADGROUP", "GROUP", keys.BROKER_GROUP, self.settings.broker_id,
            "COUNT", self.settings.read_count, "BLOCK", IDLE_BLOCK_MS, "STREAMS",
            *streams, *([">"] * len(streams)),
        ]
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                resp = stream_entries(await self._reads.call(*read))
                if resp:
                    self._take_in(resp)
                    self._kick.set()
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

    def _take_in(self, resp: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]) -> None:
        now = time.monotonic()
        wall = time.time_ns()
        for stream, entries in resp:
            model = self._models[stream]
            levels = max(1, model.mv.settings.priority_levels)
            ahead = self._pools[model.pool].rows_ahead
            for entry_id, fields in entries:
                cancel = parse_cancel(fields)
                if cancel is not None:
                    gateway, corrs = cancel
                    for corr in corrs:
                        req = model.sched.cancel(gateway, corr)
                        if req is not None:
                            self.cancelled += 1
                            self._release(model, req)
                    model.done.append(Entry(entry_id, 0, 0))
                    continue
                g = parse_group(fields)
                n = len(g.payloads)
                entry = Entry(entry_id, n, n)
                flat = g.members
                for i in range(n):
                    corr, rows, deadline_ns, timeout_ns = flat[i * GROUP_STRIDE : (i + 1) * GROUP_STRIDE]
                    model.sched.add(Request(
                        entry, g.gateway, corr, rows, g.enqueued_ns, now,
                        deadline=now + (deadline_ns - wall) / 1e9 if deadline_ns else math.inf,
                        timeout_at=now + (timeout_ns - wall) / 1e9 if timeout_ns else math.inf,
                        level=min(g.level, levels - 1), shape=g.shape, payload=g.payloads[i],
                    ), ahead_rows=ahead)

    @staticmethod
    def _release(model: _Model, req: Request) -> None:
        """A request left the queue; its entry is acknowledged once all of its requests have."""
        entry = req.entry
        entry.remaining -= 1
        if entry.remaining == 0:
            model.done.append(entry)

    # --- completions --------------------------------------------------------------------

    async def _listener(self) -> None:
        channels = [keys.done_channel(p) for p in self._pools]
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg["type"] == "message":
                        self._on_done(msg["channel"].decode(), msg["data"])
            except REDIS_DOWN as exc:
                log.warning("done-notice listener: redis unreachable (%s); retrying", exc)
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("done-notice listener failed; retrying")
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_done(self, channel: str, data: bytes) -> None:
        now = time.monotonic()
        model_name, version, rows, compute_ns, ids = parse_done(data)
        pool = self._by_channel.get(channel)
        if pool is None:
            return
        sent = [t for i in ids if (t := pool.finished(i, now)) is not None]
        model = self._by_key.get((model_name, version))
        if model is not None and rows > 0:
            model.sched.observe_done(rows, now)
            lat = model.sched.latency
            compute = compute_ns / 1e9
            lat.observe(rows, compute)
            if sent:
                lat.observe_overhead(now - min(t for t, _ in sent) - compute)
                hop = max(0.0, now - min(start for _, start in sent) - compute)
                pool.hop = hop if pool.hop == 0 else 0.9 * pool.hop + 0.1 * hop
        self._kick.set()

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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), wait)

    def _room(self, pool: _Pool) -> int:
        return max(1, self.live.pools[pool.name]) * self.settings.pool_depth - len(pool.unfinished)

    def _release_at(self, pool: _Pool, now: float, formed: list[float]) -> float:
        """When an adaptive batch should leave: one hop ahead of the moment a worker frees up."""
        return pool.free_at(self.live.pools[pool.name], now, formed) - pool.hop

    def _next_wake(self, now: float) -> float:
        wake = now + IDLE_BLOCK_MS / 1000
        for pool in self._pools.values():
            full = self._room(pool) <= 0
            for model in pool.models:
                sched = model.sched
                if not sched.live:
                    continue
                check = sched.next_check()
                if check is not None:
                    wake = min(wake, check)
                if full:
                    wake = min(wake, pool.checked + RESYNC_S)  # waiting for room: check for lost notices
                else:
                    hold = sched.hold_for(self._release_at(pool, now, []))
                    if (closes := sched.window_closes(hold)) is not None:
                        wake = min(wake, closes)
        return max(0.0, wake - now)

    async def _dispatch(self, now: float, *, drain: bool) -> None:
        commands: list[list[bytes | str | int]] = []
        sent: list[tuple[_Model, list[Request]]] = []
        rejections: list[tuple[_Model, Rejection]] = []
        check: list[_Pool] = []
        for pool in self._pools.values():
            for model in pool.models:
                for rej in model.sched.expire(now):
                    rejections.append((model, rej))
                    self._release(model, rej.request)
            batches = self._form(pool, now, drain)
            for model, batch in batches:
                members = [Member(r.gateway, r.corr, r.rows, r.enqueued_ns,
                                  _wall_ns(r.deadline, now), r.payload) for r in batch]
                xadd: list[bytes | str | int] = ["XADD", pool.stream, "*"]
                for f, v in batch_fields(model.mv.name, model.mv.version, batch[0].shape, members).items():
                    xadd += (f, v)
                commands.append(xadd)
                sent.append((model, batch))
                for r in batch:
                    self._release(model, r)
            if (pool.unfinished and self._room(pool) <= 0 and now - pool.checked >= RESYNC_S
                    and any(m.sched.live for m in pool.models)):
                check.append(pool)
        acks: list[_Model] = []
        for model in self._models.values():
            if model.done:
                count = sum(e.count for e in model.done)
                commands.append(["EVALSHA", self._sha_ack, 2, model.stream, model.counter, keys.BROKER_GROUP,
                                 count, *(e.entry_id for e in model.done)])
                acks.append(model)
        commands += self._rejection_commands(rejections)
        # Entries still in the stream are unfinished; the others' done notices were lost.
        checked = [(pool, entry_id) for pool in check for entry_id in pool.unfinished]
        commands += [["XRANGE", pool.stream, entry_id, entry_id] for pool, entry_id in checked]
        if not commands:
            return
        try:
            replies = await self._writes.execute(commands)
        except BaseException:
            # Not handed over: back to the front of their queues, to go out on the next
            # attempt (a batch that did reach Redis is then sent twice, and the gateway
            # drops the second reply).  Acknowledgements wait for the next round.
            for model, batch in reversed(sent):
                model.sched.requeue(batch)
                for r in batch:
                    r.entry.remaining += 1
                    if r.entry.remaining == 1 and r.entry in model.done:
                        model.done.remove(r.entry)
            self._kick.set()
            raise
        for model in acks:
            model.done.clear()
        self.batches_sent += len(sent)
        self.rejected += len(rejections)
        sent_at = time.monotonic()
        for (model, batch), entry_id in zip(sent, replies, strict=False):
            rows = sum(r.rows for r in batch)
            pool = self._pools[model.pool]
            pool.dispatched(entry_id, sent_at, rows, model.sched.latency.compute(rows), self.live.pools[pool.name])
        for pool in check:
            pool.checked = sent_at
        for (pool, entry_id), found in zip(checked, replies[len(replies) - len(checked):], strict=True):
            if not found:
                log.warning("no done notice for batch %s of pool %s; counting it as finished",
                            entry_id.decode(), pool.name)
                pool.unfinished.pop(entry_id, None)

    def _form(self, pool: _Pool, now: float, drain: bool) -> list[tuple[_Model, list[Request]]]:
        """Batches for one pool, taking turns among its models while it has room."""
        out: list[tuple[_Model, list[Request]]] = []
        room = math.inf if drain else self._room(pool)
        models = pool.models
        formed: list[float] = []  # expected compute of the batches formed so far
        idle = 0
        while room > 0 and idle < len(models):
            model = models[pool.turn % len(models)]
            pool.turn += 1
            # A batch never waits while a worker is idle; while all are busy it gathers until
            # one is about to be free (adaptive), since it could not start earlier anyway.
            hold = 0.0 if drain else model.sched.hold_for(self._release_at(pool, now, formed))
            batch = model.sched.take(now, drain=drain, hold_s=hold)
            if batch:
                out.append((model, batch))
                formed.append(model.sched.latency.compute(sum(r.rows for r in batch)))
                room -= 1
                idle = 0
            else:
                idle += 1
        return out

    def _rejection_commands(self, rejections: list[tuple[_Model, Rejection]]) -> list[list[bytes | str | int]]:
        if not rejections:
            return []
        fails: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        wall = time.time_ns()
        for model, rej in rejections:
            f = fails[keys.stats_hash(model.mv.name, model.mv.version)]
            f[0] += 1
            f[1] += max(0, wall - rej.request.enqueued_ns)
        commands = scripts.push_reply_commands(
            (rej.request.gateway, encode_reply(rej.request.corr, Code.DEADLINE_EXCEEDED, rej.message.encode()))
            for _, rej in rejections
        )
        for key, (count, ns) in fails.items():
            commands += [["HINCRBY", key, Stat.FAIL_COUNT, count], ["HINCRBY", key, Stat.FAIL_NS, ns]]
        return commands


def _wall_ns(deadline: float, now: float) -> int:
    """A monotonic deadline as wall-clock ns for the worker (0 = none)."""
    if deadline == math.inf:
        return 0
    return time.time_ns() + int((deadline - now) * 1e9)
