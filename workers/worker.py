"""The worker process: take batches from its pool's stream, run them, reply, acknowledge.

The main loop claims batches and runs them (on the event loop by default: a
thread hand-off per batch costs more than it overlaps), then writes each
batch's replies and its acknowledgement (XDEL + XACK) to the socket at once,
in one pipeline, replies first.  (The pipeline is not a transaction: if Redis
refuses a reply but accepts the acknowledgement, at maxmemory, that reply is
lost and its caller gets DEADLINE_EXCEEDED; see docs/reliability.md.)
A *writer* task waits for Redis to confirm each write and retries it until
it does.

A *reclaimer* task takes over the batches of workers of the same pool that
died (broker.reclaim) and decides, per batch, to re-run it, split it or
dead-letter it (workers.recovery).

When a worker falls behind, batches queue on the pool stream; its next read
claims up to ``coalesce`` of them at once and merges those of the same model
into one run (never over max_batch_size), so batch size grows with load even
when the broker's window is short.  Entries that do not fit are run next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from broker import keys, scripts
from broker.handoff import Handoff, Settled
from broker.messages import (
    Member,
    Stat,
    WorkerInfo,
    batch_trace,
    done_notice,
    encode_reply,
    model_label,
    parse_batch,
)
from broker.reclaim import (
    FORGET_EVERY,
    ORPHAN_IDLE_MS,
    RECLAIM_S,
    claim_forgotten,
    claim_orphans,
    forget_dead_consumers,
    live_members,
)
from ferry import metrics
from ferry.errors import Code
from ferry.lifecycle import cancel_all, settle_heap
from ferry.redis_conn import REDIS_DOWN, connect, ensure_group
from ferry.repository import Repository
from ferry.resp import RespError, stream_entries
from ferry.resp_cluster import data_client
from ferry.settings import WorkerSettings
from ferry.tracing import Tracing
from workers.batch import BatchResult, BatchRunner
from workers.recovery import triage
from workers.runtime import load_runtime

log = logging.getLogger("ferry.worker")

READ_BLOCK_MS = 200
STATS_FLUSH_S = 0.1


class _Claimed:
    __slots__ = ("entry_id", "members", "model", "rows", "shape", "trace", "version")

    def __init__(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        self.entry_id = entry_id
        self.model, self.version, self.shape, self.members = parse_batch(fields)
        self.trace = batch_trace(fields)
        self.rows = sum(m.rows for m in self.members)

    @property
    def kind(self) -> tuple[str, int, str]:
        return self.model, self.version, self.shape


class Worker:
    def __init__(self, settings: WorkerSettings, repo: Repository, handoff: Handoff | None = None) -> None:
        self.settings = settings
        # Set when the broker runs in this process too (ferry broker --colocated-worker): batches it
        # hands over directly (broker.handoff), besides those on the pool stream.
        self.handoff = handoff
        self.stream = keys.pool_stream(settings.pool)
        self.done_channel = keys.done_channel(settings.pool)
        self.models: dict[tuple[str, int], BatchRunner] = {}
        for mv in repo.all_versions():
            if settings.pool in mv.settings.pool_names:
                self.models[mv.key] = BatchRunner(mv, load_runtime(settings, mv))
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        self._reads = data_client(settings.redis_url, settings.redis_timeout_s + READ_BLOCK_MS / 1000)
        self._writes = data_client(settings.redis_url, settings.redis_timeout_s)
        self._stopping = asyncio.Event()
        self._broken: Exception | None = None  # a handed batch failed (a bug): stop, and exit with it
        self._carry: list[_Claimed] = []
        self._reclaimed: list[_Claimed] = []  # taken over from dead workers; run before new reads
        # Entry ids read and not yet acknowledged for sure: what broker.reclaim.claim_forgotten
        # must not take back.
        self._in_hand: set[bytes] = set()
        self._fault = _id_marker(settings.fault_exit_on_id) if settings.fault_exit_on_id else b""
        self.tracing = Tracing("ferry-worker", settings.otlp_endpoint, settings.trace_sample_ratio, settings.worker_id)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="ferry-compute")
        self._outbox: asyncio.Queue[
            tuple[list[list[bytes | str | int]], asyncio.Future[list[Any]] | None, list[bytes], Settled | None]
        ] = asyncio.Queue(4)
        self.batches_run = 0
        self._profile: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
        # Statistics accumulate here and reach Redis every STATS_FLUSH_S, not per batch.
        self._stats: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await scripts.load_all(self._writes)
        await ensure_group(self.redis, self.stream, keys.WORKER_GROUP)
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        writer = asyncio.create_task(self._writer(), name="writer")
        stats = asyncio.create_task(self._stats_loop(), name="stats")
        reclaimer = asyncio.create_task(self._reclaimer(), name="reclaimer")
        tasks = [writer, heartbeat, stats, reclaimer]
        if self.handoff is not None:
            tasks.append(asyncio.create_task(self._run_handed(self.handoff), name="handed"))
        settle_heap()
        log.info("worker %s serving pool %s: %s", self.settings.worker_id, self.settings.pool,
                 ", ".join(f"{n} v{v}" for n, v in self.models) or "no models")
        try:
            while not self._stopping.is_set() or self._carry or self._reclaimed:
                try:
                    claimed = await self._claim()
                except REDIS_DOWN as exc:
                    log.warning("redis unreachable (%s); retrying", exc)
                    await asyncio.sleep(0.2)
                    continue
                except RespError as exc:
                    if not exc.group_lost:
                        raise
                    # Redis lost its data (restart without persistence, FLUSHALL): recreate.
                    log.warning("consumer group is gone (%s); recreating it", exc)
                    await ensure_group(self.redis, self.stream, keys.WORKER_GROUP)
                    continue
                if claimed:
                    await self._execute(claimed)
            if self.handoff is not None and self._broken is None:
                # Its broker stopped first and handed over what it held: run that too.
                await self.handoff.drained()
            try:
                await asyncio.wait_for(self._outbox.join(), self.settings.grace_s)
            except TimeoutError:
                log.error("%d reply writes still unconfirmed after %.0fs; exiting, their batches stay pending",
                          self._outbox.qsize() + 1, self.settings.grace_s)
        finally:
            await cancel_all(tasks)
            await self._flush_stats()
            await self._unregister()
            self._compute.shutdown(wait=True)
            await self.redis.aclose()
            await self._reads.close()
            await self._writes.close()
            self.tracing.shutdown()
            log.info("worker %s stopped after %d batches", self.settings.worker_id, self.batches_run)
        if self._broken is not None:
            raise self._broken

    async def _read(self, count: int, block: int | None) -> list[_Claimed]:
        args: list[bytes | str | int] = ["XREADGROUP", "GROUP", keys.WORKER_GROUP, self.settings.worker_id,
                                         "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        reply = await self._reads.call(*args, "STREAMS", self.stream, ">")
        claimed = [_Claimed(eid, fields) for _, entries in stream_entries(reply) for eid, fields in entries]
        self._in_hand.update(c.entry_id for c in claimed)
        return claimed

    async def _claim(self) -> list[_Claimed]:
        """Claimed batch entries of one model and shape key that together fit in one run."""
        if not self._carry and self._reclaimed:
            self._carry, self._reclaimed = self._reclaimed, []
        if not self._carry:
            if self._stopping.is_set():
                return []
            # One blocking read takes whatever queued up to ``coalesce`` entries:
            # one when the worker keeps up, several to merge when it fell behind.
            self._carry = await self._read(self.settings.coalesce, READ_BLOCK_MS)
            if not self._carry:
                return []
        first = self._carry[0]
        runner = self.models.get((first.model, first.version))
        limit = runner.mv.settings.max_batch_size if runner else 0
        take, keep, rows = [first], [], first.rows
        for c in self._carry[1:]:
            if limit and c.kind == first.kind and rows + c.rows <= limit:
                take.append(c)
                rows += c.rows
            else:
                keep.append(c)
        self._carry = keep
        return take

    async def _execute(self, claimed: list[_Claimed]) -> None:
        first = claimed[0]
        ids = [c.entry_id for c in claimed]
        members: list[Member] = [m for c in claimed for m in c.members]
        result, elapsed, ended = await self._compute_batch(first.model, first.version, members)
        # Rows 0 (nothing ran): the notice only frees room in the pool; the broker learns nothing from it.
        took = elapsed if result.rows_run else 0
        commands = self._reply_commands(ids, result)
        commands.append(["PUBLISH", self.done_channel, done_notice(first.model, first.version, result.rows_run,
                                                                   took, ids)])
        # Replies hit the socket now, before the bookkeeping below and the next read; the writer
        # only waits for Redis to confirm them (and retries if it did not).
        sent = self._writes.send_now(commands)
        self._give_way()
        self._account(first.model, first.version, members, result, elapsed, ended, first.trace, len(claimed))
        await self._outbox.put((commands, sent, ids, None))

    async def _run_handed(self, handoff: Handoff) -> None:
        """Batches the broker in this process hands over: no stream entry to read or settle and no
        done notice; the reply pipeline acknowledges their request entries instead (broker.handoff)."""
        while True:
            batch = await handoff.take()
            try:
                result, elapsed, ended = await self._compute_batch(batch.model, batch.version, batch.members)
                settled = handoff.finish(batch)
                commands = scripts.push_reply_commands(result.replies) + settled.commands
                self._outbox.put_nowait((commands, self._writes.send_now(commands), [], settled))
                self._give_way()
                # The client waits for the replies, not for this: room in the pool, the latency the
                # broker learns, statistics.
                handoff.ran(batch, result.rows_run, elapsed if result.rows_run else 0)
                self._account(batch.model, batch.version, batch.members, result, elapsed, ended, batch.trace, 1)
            except Exception as exc:
                # A bug (the model's own errors are replies): like a crash on the stream path, the
                # process stops; the batch's requests stay pending and another broker takes them over.
                log.exception("a batch handed over in-process failed; stopping this worker")
                handoff.close()
                self._broken = exc
                self._stopping.set()
                return

    def _give_way(self) -> None:
        """A batch's replies are on the socket: let Redis and the gateway, where they share this core,
        pass them on before this process goes on with bookkeeping and its next batch.  Otherwise they
        waited until the kernel preempted it, often after that next batch had computed (docs/architecture.md
        has the measurements).  With no other process waiting for the core it returns at once."""
        if self.settings.yield_after_replies:
            os.sched_yield()

    async def _compute_batch(self, model: str, version: int, members: list[Member]
                             ) -> tuple[BatchResult, int, int]:
        """Run one batch: its result, how long it took (ns) and when it ended (wall clock, ns: the
        trace span's end, taken here because the replies leave before the span is recorded)."""
        runner = self.models.get((model, version))
        if self._fault and any(self._fault in m.payload for m in members):
            log.critical("fault injection: request id %r is in this batch; killing this worker",
                         self.settings.fault_exit_on_id)
            os.kill(os.getpid(), signal.SIGKILL)
        started = time.perf_counter_ns()
        if runner is None:
            result = BatchResult()
            msg = f"worker {self.settings.worker_id} does not serve model {model!r} v{version}"
            result.replies = [(m.gateway, encode_reply(m.corr, Code.UNAVAILABLE, msg.encode())) for m in members]
        elif self.settings.compute_thread:
            result = await asyncio.get_running_loop().run_in_executor(self._compute, runner.run, members)
        else:
            result = runner.run(members)
        return result, time.perf_counter_ns() - started, time.time_ns()

    def _account(self, model: str, version: int, members: list[Member], result: BatchResult, elapsed: int,
                 ended: int, trace: str, batches: int) -> None:
        """A batch's statistics, trace span and metrics, once its replies are on their way."""
        self.batches_run += 1
        self._add_stats((model, version), result.stats)
        if self.tracing.enabled and trace:
            self.tracing.compute_span(trace, [m.trace for m in members], ended - elapsed, ended,
                                      {"ferry.model": model, "ferry.rows": result.rows_run,
                                       "ferry.pool": self.settings.pool, "ferry.batches": batches})
        if result.rows_run:
            took = elapsed / 1e9
            self._observe_latency((model, version), result.rows_run, took)
            labels = (model, str(version))
            metrics.COMPUTE_DURATION.labels(*labels).observe(took)
            metrics.BATCH_SIZE.labels(*labels).observe(result.rows_run)
            metrics.INFERENCES.labels(*labels).inc(result.rows_run)
            metrics.EXECUTIONS.labels(*labels).inc()

    def _reply_commands(self, ids: list[bytes], result: BatchResult) -> list[list[bytes | str | int]]:
        """Replies first (one bundle per gateway), then the batch entries deleted and acknowledged."""
        commands = scripts.push_reply_commands(result.replies)
        commands += scripts.settle_entries(self.stream, ids)
        return commands

    async def _writer(self) -> None:
        while True:
            commands, sent, ids, settled = await self._outbox.get()
            try:
                await self._write(commands, sent)
                self._in_hand.difference_update(ids)
                while settled is not None:
                    assert self.handoff is not None
                    follow_up = self.handoff.confirmed(settled)
                    settled = follow_up
                    if follow_up is not None:
                        await self._write(follow_up.commands, None)
            except Exception:
                # A bug here must not stop the writer: the batch stays pending in Redis, and
                # once out of hand the reclaimer runs it again (claim_forgotten).
                log.exception("writing replies failed; the batch stays pending and will run again")
                self._in_hand.difference_update(ids)
                if settled is not None and self.handoff is not None:
                    self.handoff.lost(settled)
            finally:
                self._outbox.task_done()

    async def _write(self, commands: list[list[bytes | str | int]], sent: asyncio.Future[list[Any]] | None) -> None:
        """Until Redis confirms ``commands`` (already ``sent``, or not yet): retried, never dropped."""
        delay = 0.05
        while True:
            try:
                if sent is None:
                    await self._writes.execute(commands)
                else:
                    await self._writes.confirm(sent)
                return
            except RespError as exc:
                if "NOSCRIPT" not in str(exc):
                    raise
                # Redis restarted (or flushed its scripts) since we loaded it.
                await scripts.load_all(self._writes)
            except REDIS_DOWN as exc:
                # The batch stays pending until its replies are written: retry, never drop.
                log.warning("redis unreachable writing replies (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            sent = None

    async def _reclaimer(self) -> None:
        passes = 0
        while True:
            await asyncio.sleep(RECLAIM_S)
            passes += 1
            try:
                await self._reclaim_once(forget=passes % FORGET_EVERY == 0)
            except REDIS_DOWN as exc:
                log.warning("reclaiming dead workers' batches: redis unreachable (%s)", exc)
            except Exception:
                log.exception("reclaiming dead workers' batches failed; trying again")

    async def _reclaim_once(self, *, forget: bool = False) -> None:
        live = await live_members(self._writes, keys.WORKERS)
        live.add(self.settings.worker_id.encode())
        me = self.settings.worker_id
        claimed = await claim_orphans(self._writes, self.stream, keys.WORKER_GROUP, me, live, ORPHAN_IDLE_MS)
        forgotten = await claim_forgotten(self._writes, self.stream, keys.WORKER_GROUP, me, self._in_hand)
        if forgotten:
            # Batches of its own that Redis brought back (it lost writes: a failover, an AOF
            # restart), or whose replies this worker failed to write: run them again.
            log.warning("%d batch(es) of this worker's own are pending but not in hand; running them again",
                        len(forgotten))
            self._in_hand.update(c.entry_id for c in forgotten)
            self._reclaimed += [_Claimed(c.entry_id, c.fields) for c in forgotten]
            metrics.RECOVERED.labels(self.settings.pool, "forgotten").inc(len(forgotten))
        if claimed:
            plan = triage(claimed, self.settings.pool, self.settings.max_attempts)
            if plan.commands:
                await self._writes.execute(plan.commands)
            self._in_hand.update(c.entry_id for c in plan.run)
            self._reclaimed += [_Claimed(c.entry_id, c.fields) for c in plan.run]
            log.warning("took over %d batch(es) of dead workers: %d to run again, %d split, %d dead-lettered",
                        len(claimed), len(plan.run), plan.split, plan.dead)
            metrics.TAKEN_OVER.labels("worker").inc(len(claimed))
            for outcome, n in (("rerun", len(plan.run)), ("split", plan.split), ("dead_letter", plan.dead)):
                metrics.RECOVERED.labels(self.settings.pool, outcome).inc(n)
        if forget:
            await forget_dead_consumers(self._writes, self.stream, keys.WORKER_GROUP, live, ORPHAN_IDLE_MS)

    def _add_stats(self, model_key: tuple[str, int], stats: dict[str, int]) -> None:
        totals = self._stats[model_key]
        for field, value in stats.items():
            # Counters add up; the last-inference time is a timestamp and keeps the newest.
            totals[field] = max(totals[field], value) if field == Stat.LAST_INFERENCE_MS else totals[field] + value

    async def _flush_stats(self) -> None:
        if not self._stats:
            return
        stats, self._stats = self._stats, defaultdict(lambda: defaultdict(int))
        # On the data-path client: a redis-py pipeline of a hundred HINCRBYs (a field per batch
        # size) cost milliseconds of Python every flush.
        commands: list[list[bytes | str | int]] = []
        for (name, version), totals in stats.items():
            key = keys.stats_hash(name, version)
            for field, value in totals.items():
                commands.append(["HSET" if field == Stat.LAST_INFERENCE_MS else "HINCRBY", key, field, value])
        try:
            await self._writes.execute(commands)
        except REDIS_DOWN as exc:
            log.warning("could not write statistics (%s); keeping them for the next flush", exc)
            for model_key, totals in stats.items():
                self._add_stats(model_key, totals)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_FLUSH_S)
            try:
                await self._flush_stats()
            except Exception:
                log.exception("writing statistics failed")

    def _description(self) -> bytes:
        devices = sorted({d for runner in self.models.values() for d in runner.runtime.devices})
        labels = {key: model_label(*key) for key in self.models}
        return WorkerInfo(
            pool=self.settings.pool, runtime=self.settings.runtime, host=socket.gethostname(), devices=devices,
            models=list(self.models),
            batch_sizes={labels[k]: list(r.mv.settings.static_batch_sizes) for k, r in self.models.items()},
            max_batch={labels[k]: r.mv.settings.max_batch_size for k, r in self.models.items()},
            profile={labels[k]: {str(rows): round(ms, 3) for rows, ms in sorted(p.items())}
                     for k, p in self._profile.items()},
            batches=self.batches_run,
        ).encode()

    def _observe_latency(self, model_key: tuple[str, int], rows: int, seconds: float) -> None:
        """The batch-latency profile the worker publishes: a moving average per power-of-two size."""
        bucket = 1 << max(0, rows - 1).bit_length()
        per = self._profile[model_key]
        ms = seconds * 1000
        per[bucket] = ms if bucket not in per else 0.8 * per[bucket] + 0.2 * ms

    async def _heartbeat(self) -> None:
        failing = False
        while True:
            info = self._description()
            now_ms = int(time.time() * 1000)
            try:
                # On the data-path connection, so that during a failover the registry is
                # written where the replies go (redis-py may already talk to the new primary).
                sent_at = time.perf_counter()
                await self._writes.execute([
                    ["ZADD", keys.WORKERS, now_ms + keys.HEARTBEAT_TTL_MS, self.settings.worker_id],
                    ["SET", keys.worker_info(self.settings.worker_id), info, "PX", keys.HEARTBEAT_TTL_MS],
                    ["ZREMRANGEBYSCORE", keys.WORKERS, "-inf", now_ms],
                    ["DEL", keys.wake_list(self.settings.pool)],  # the pool is awake
                ])
                metrics.REDIS_RTT.labels("worker").observe(time.perf_counter() - sent_at)
            except Exception as exc:  # down, or refusing writes (OOM): try again soon
                if not failing:
                    log.warning("heartbeat failed (%s); retrying every 0.1 s", exc)
                failing = True
                # Soon, not in a second: after a failover the new primary may hold this
                # worker's registration as it was seconds ago, about to expire.
                await asyncio.sleep(0.1)
                continue
            if failing:
                log.info("heartbeat restored")
                failing = False
            await asyncio.sleep(keys.HEARTBEAT_INTERVAL_S)

    async def _unregister(self) -> None:
        try:
            await self._writes.execute([["ZREM", keys.WORKERS, self.settings.worker_id],
                                        ["DEL", keys.worker_info(self.settings.worker_id)]])
        except (*REDIS_DOWN, RespError) as exc:
            log.warning("could not unregister (the heartbeat will expire): %s", exc)


def _id_marker(request_id: str) -> bytes:
    """How ``ModelInferRequest.id`` (field 3, a string) appears in a serialized request."""
    raw = request_id.encode()
    if len(raw) > 127:
        raise ValueError("fault_exit_on_id must be at most 127 bytes")
    return b"\x1a" + bytes([len(raw)]) + raw
