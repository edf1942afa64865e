"""The broker process: read request groups from every model's stream, form batches, hand them to pools.

Two tasks share the in-memory queues (one event loop, so no locks):

* the *reader* blocks in ``XREADGROUP`` over all request streams and hands
  out every batch that is full as soon as it is read;
* the *timer* hands out partial batches when their window closes.  It runs on
  the event loop's clock because Redis only wakes blocked clients on its
  ``hz`` tick (100 ms by default), far too coarse for batching windows.

A batch goes out in one pipelined round trip: XADD to the pool stream, then
XACK + XDEL of its groups.  The batch is written before its requests are
acknowledged, so a broker that dies in between leaves them pending, not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker import keys
from broker.batcher import ModelQueue, Pending
from broker.messages import batch_fields, parse_group
from ferry.redis_conn import REDIS_DOWN, connect, ensure_group
from ferry.repository import ModelVersion, Repository
from ferry.resp import RespClient, RespError, stream_entries
from ferry.settings import BrokerSettings

log = logging.getLogger("ferry.broker")

IDLE_BLOCK_MS = 200  # how often an idle reader looks at its stop flag
TIMER_SLACK_S = 0.001


class Broker:
    def __init__(self, settings: BrokerSettings, repo: Repository) -> None:
        self.settings = settings
        self.repo = repo
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        self._reads = RespClient(settings.redis_url, settings.redis_timeout_s + IDLE_BLOCK_MS / 1000)
        self._writes = RespClient(settings.redis_url, settings.redis_timeout_s)
        self._stopping = asyncio.Event()
        self._queued = asyncio.Event()
        self._queues: dict[bytes, tuple[ModelVersion, ModelQueue]] = {}
        for mv in repo.all_versions():
            s = mv.settings
            delay_us = settings.max_queue_delay_us if settings.max_queue_delay_us >= 0 else s.max_queue_delay_us
            queue = ModelQueue(s.max_batch_size, delay_us / 1e6, s.preferred_batch_sizes)
            self._queues[keys.request_stream(mv.name, mv.version).encode()] = (mv, queue)
        self.batches_sent = 0

    def stop(self) -> None:
        self._stopping.set()

    async def setup(self) -> None:
        for stream in self._queues:
            await ensure_group(self.redis, stream.decode(), keys.BROKER_GROUP)
        for pool in {mv.settings.pool for mv, _ in self._queues.values()}:
            await ensure_group(self.redis, keys.pool_stream(pool), keys.WORKER_GROUP)

    async def run(self) -> None:
        await self.setup()
        log.info("broker %s serving %d model version(s)", self.settings.broker_id, len(self._queues))
        timer = asyncio.create_task(self._timer(), name="timer")
        try:
            await self._reader()
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
            # Graceful stop: what was read goes out now rather than waiting for a reclaim.
            try:
                await self._dispatch(time.monotonic(), drain=True)
            except REDIS_DOWN as exc:
                log.error("could not hand over queued requests on shutdown: %s", exc)
            await self.redis.aclose()
            await self._reads.close()
            await self._writes.close()
            log.info("broker %s stopped after %d batches", self.settings.broker_id, self.batches_sent)

    async def _reader(self) -> None:
        read: list[bytes | str | int] = [
            "XREADGROUP", "GROUP", keys.BROKER_GROUP, self.settings.broker_id,
            "COUNT", self.settings.read_count, "BLOCK", IDLE_BLOCK_MS, "STREAMS",
            *self._queues, *([">"] * len(self._queues)),
        ]
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                resp = stream_entries(await self._reads.call(*read))
                now = time.monotonic()
                for stream, entries in resp:
                    _, queue = self._queues[stream]
                    for entry_id, fields in entries:
                        queue.add(Pending(entry_id, parse_group(fields), now))
                if resp:
                    self._queued.set()
                    await self._dispatch(now, drain=False)
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

    async def _timer(self) -> None:
        while True:
            due = [d for _, q in self._queues.values() if (d := q.next_due()) is not None]
            if not due:
                self._queued.clear()
                await self._queued.wait()
                continue
            wait = min(due) - time.monotonic()
            if wait > TIMER_SLACK_S:
                # Wake early when new requests arrive: another model's window may close sooner.
                self._queued.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queued.wait(), wait)
                continue
            try:
                # Event-loop timers may fire up to a millisecond early; without the
                # slack the timer would spin until the window really closes.
                await self._dispatch(time.monotonic() + TIMER_SLACK_S, drain=False)
            except REDIS_DOWN as exc:
                log.warning("redis unreachable dispatching (%s)", exc)
                await asyncio.sleep(0.05)
            except Exception:
                # A bug or an unexpected Redis answer must not stop batching for good.
                log.exception("dispatching failed; retrying")
                await asyncio.sleep(0.5)

    async def _dispatch(self, now: float, *, drain: bool) -> None:
        commands: list[list[bytes | str]] = []
        taken: list[tuple[ModelQueue, list[Pending]]] = []
        for stream, (mv, queue) in self._queues.items():
            for batch in queue.take_ready(now, drain=drain):
                taken.append((queue, batch))
                ids = [p.entry_id for p in batch]
                xadd: list[bytes | str] = ["XADD", keys.pool_stream(mv.settings.pool), "*"]
                for field, value in batch_fields(mv.name, mv.version, [p.group for p in batch]).items():
                    xadd += (field, value)
                commands += [xadd, ["XACK", stream, keys.BROKER_GROUP, *ids], ["XDEL", stream, *ids]]
                self.batches_sent += 1
        if commands:
            try:
                await self._writes.execute(commands)
            except BaseException:
                # Not handed over: back to the front of their queues, to go out on the
                # next attempt (a batch that did reach Redis is then sent twice, and the
                # gateway drops the second reply).
                for queue, batch in reversed(taken):
                    queue.requeue(batch)
                self.batches_sent -= len(taken)
                self._queued.set()
                raise
