"""Queue requests on Redis and match replies back to waiting calls.

Two long-lived tasks keep Redis work per request far below one round trip:

* the *submitter* sends everything queued since its last round trip in one
  pipeline, as one request group per model version, priority level and
  shape key (split at max_batch_size rows), each admitted by
  scripts.ENQUEUE only while the model's queue has room
  (max_queue_size; RESOURCE_EXHAUSTED otherwise).  Under load it sends at most once per
  ``flush_interval_us``, so one XADD carries many requests and every process
  downstream wakes up less often; under light load (requests arrive one per
  round trip) a request leaves at once;
* the *listener* pops this gateway's reply list in bulk (BLMPOP ... COUNT, or
  LPOP ... COUNT on Redis 6.2; each element is a bundle of replies) and resolves each call's future by
  correlation number.

A reply for a call that already gave up (deadline, cancel) finds no future
and is dropped and counted, so late replies never leak.  The same goes for
the second reply to a request that ran twice, which can happen because:

* when the submitter's Redis connection is replaced (Redis restarted, a
  Sentinel failover, a network cut), every request still waiting for its
  reply that was queued over an earlier connection is queued again: Redis
  may have lost it (a failover loses the writes the new primary had not
  yet replicated, an AOF restart those not yet fsynced), and the gateway
  cannot tell which survived.  Running a request twice costs compute;
  losing it costs its caller a timeout.  A call cancelled by
its client also sends a cancellation down the model's request stream, so a
request that is still queued leaves the queue instead of running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from typing import Any

from broker import keys, scripts
from broker.messages import Queued, Stat, cancel_fields, group_fields, iter_replies
from ferry import metrics
from ferry.errors import DeadlineExceeded, FerryError, ResourceExhausted, Unavailable
from ferry.lifecycle import cancel_all
from ferry.redis_conn import REDIS_DOWN, connect, unavailable
from ferry.repository import ModelVersion
from ferry.resp import DataClient, RedisBusy, RespError, is_transient
from ferry.resp_cluster import data_client
from ferry.settings import GatewaySettings
from gateway.validate import Admission

log = logging.getLogger("ferry.gateway")

LISTEN_BLOCK_S = 1.0
POP_COUNT = 256
# The flush interval engages once a round trip carries this many requests.  4 kept
# sparse random arrivals from waiting (about -1 ms p50 at 500/s open loop) but cost
# ~20% of closed-loop throughput at concurrency 32 on the 2-core box; 2 it is.
FLUSH_MIN_GROUP = 2
MAX_GROUP = 1024  # requests per group: keeps a script call's argument count far below Lua's limit

Reply = tuple[int, bytes]
_Outbox = tuple[ModelVersion, int, str]  # model version, level, shape key


def _fail(fut: asyncio.Future[Reply], err: FerryError) -> None:
    if not fut.done():
        fut.set_exception(err)


def _expire(fut: asyncio.Future[Reply], mv: ModelVersion, timeout_s: float) -> None:
    if not fut.done():
        message = f"no answer from model {mv.name!r} v{mv.version} within {timeout_s:.3f}s"
        fut.set_exception(DeadlineExceeded(message))


class Dispatcher:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.reply_key = keys.reply_list(settings.gateway_id)
        self.alive_key = keys.gateway_alive(settings.gateway_id)
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        # The data path: pipelined writes, and a blocking-read connection of its own.
        self._resp = data_client(settings.redis_url, settings.redis_timeout_s)
        self._listen = data_client(settings.redis_url, settings.redis_timeout_s + LISTEN_BLOCK_S)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._corr = itertools.count(1)
        # A future of None marks a re-sent copy (see _resend_if_reconnected).
        self._outbox: dict[_Outbox, list[tuple[Queued, asyncio.Future[Reply] | None]]] = defaultdict(list)
        self._cancels: dict[ModelVersion, list[int]] = defaultdict(list)
        # corr -> (where it queues, the request): what a replaced connection may have lost
        self._inflight: dict[int, tuple[_Outbox, Queued]] = {}
        # (submitter's, listener's) connections opened so far: see _resend_if_reconnected
        self._connection = (0, 0)
        self._rtt = metrics.REDIS_RTT.labels("gateway")
        # What the round in flight sends (empty between rounds).
        self._round: list[tuple[_Outbox, Queued, asyncio.Future[Reply] | None]] = []
        self._round_cancels: dict[ModelVersion, list[int]] = {}
        self._down_since: float | None = None  # since when Redis has been unreachable
        self._sha_enqueue = scripts.sha(scripts.ENQUEUE)
        self._ready = asyncio.Event()
        self._last_flush = 0.0
        self._last_group = 0
        self._interval = settings.flush_interval_us / 1e6
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._blmpop = False
        self.late_replies = 0
        metrics.INFLIGHT.set_function(lambda: len(self._pending))

    @property
    def resp(self) -> DataClient:
        """The data-path Redis client, shared with the worker registry's reads."""
        return self._resp

    async def start(self) -> None:
        try:
            info = (await self._resp.call("INFO", "server")).decode()
            version = next((line.split(":", 1)[1] for line in info.splitlines()
                            if line.startswith("redis_version:")), "0")
            self._blmpop = int(version.split(".")[0]) >= 7
        except (*REDIS_DOWN, RespError) as exc:
            log.warning("cannot read the Redis version (%s); assuming Redis 6.2", exc)
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._submitter(), name="submitter"),
            asyncio.create_task(self._listener(), name="listener"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]

    async def _heartbeat_once(self) -> None:
        try:
            # The data-path connection: during a failover, the primary this gateway's requests go to.
            await self._resp.execute([["SET", self.alive_key, b"1", "PX", keys.GATEWAY_ALIVE_TTL_MS]])
        except Exception as exc:  # down, or refusing writes (OOM): try again next beat
            log.warning("gateway heartbeat failed: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(keys.HEARTBEAT_INTERVAL_S)
            await self._heartbeat_once()
            # A connection replaced after the last round (a failover at the end of a burst) must
            # not wait for the next request to have what it carried re-sent.
            self._resend_if_reconnected()

    async def close(self) -> None:
        await cancel_all(self._tasks)
        try:
            # Alive first: from then on workers drop replies instead of pushing them.
            await self._resp.execute([["DEL", self.alive_key], ["DEL", self.reply_key]])
        except (*REDIS_DOWN, RespError):
            pass  # both expire on their own
        if self.late_replies:
            log.info("dropped %d replies whose calls had already ended (deadline or cancel)", self.late_replies)
        await self.redis.aclose()
        await self._resp.close()
        await self._listen.close()

    async def submit(self, mv: ModelVersion, adm: Admission, payload: bytes, timeout_s: float,
                     trace: str = "") -> Reply:
        """Queue one validated request; wait for its (code, body) reply."""
        if len(self._pending) >= self.settings.max_inflight:
            raise ResourceExhausted(
                f"this gateway already holds {len(self._pending)} requests (max_inflight "
                f"{self.settings.max_inflight}); retry later, on another gateway, or raise max_inflight"
            )
        corr = next(self._corr)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        self._pending[corr] = fut
        now_ns = time.time_ns()
        timeout_ns = now_ns + adm.queue_timeout_us * 1000 if adm.queue_timeout_us else 0
        queued = Queued(corr, adm.rows, now_ns + int(timeout_s * 1e9), timeout_ns, payload, trace)
        where = (mv, adm.level, adm.shape)
        self._outbox[where].append((queued, fut))
        self._inflight[corr] = (where, queued)
        # Under light load (the last round trip carried fewer than FLUSH_MIN_GROUP
        # requests, or none was sent for a whole interval) a request leaves at once;
        # otherwise it waits at most one interval for others to share its round trip.
        since = loop.time() - self._last_flush
        if self._last_group < FLUSH_MIN_GROUP or since >= self._interval:
            self._ready.set()
        elif self._timer is None:
            # The rest of the interval, not a whole one from now: at most one round per interval.
            self._timer = loop.call_later(self._interval - since, self._ready.set)
        timer = loop.call_later(timeout_s, _expire, fut, mv, timeout_s)
        try:
            return await fut
        except asyncio.CancelledError:
            # The client went away: take the request out of the queue if it is still there.
            self._cancels[mv].append(corr)
            self._ready.set()
            raise
        finally:
            timer.cancel()
            del self._pending[corr]
            del self._inflight[corr]

    def count_failure(self, mv: ModelVersion, ns: int) -> None:
        """Add a failed request to the model's statistics, without waiting (best effort)."""
        key = keys.stats_hash(mv.name, mv.version)
        sent = self._resp.send_now([["HINCRBY", key, Stat.FAIL_COUNT, 1], ["HINCRBY", key, Stat.FAIL_NS, ns]])
        if sent is not None:
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())

    @staticmethod
    def _groups(mv: ModelVersion, queued: list[tuple[Queued, asyncio.Future[Reply] | None]]
                ) -> list[list[tuple[Queued, asyncio.Future[Reply] | None]]]:
        limit = mv.settings.max_batch_size
        most = min(MAX_GROUP, mv.settings.queue_policy.max_queue_size)
        if limit == 0:
            return [[q] for q in queued]
        groups: list[list[tuple[Queued, asyncio.Future[Reply] | None]]] = [[]]
        rows = 0
        for q in queued:
            if rows + q[0].rows > limit or len(groups[-1]) >= most:
                groups.append([])
                rows = 0
            groups[-1].append(q)
            rows += q[0].rows
        return groups

    def _commands(self) -> tuple[list[list[bytes | str | int]], list[tuple[ModelVersion, list[Any]]]]:
        """One round trip's commands, and per command the futures it admits (or [] for none)."""
        outbox, self._outbox = self._outbox, defaultdict(list)
        self._round = []
        cancels, self._cancels = self._cancels, defaultdict(list)
        self._round_cancels = cancels
        now_ns = time.time_ns()
        gw = self.settings.gateway_id
        commands: list[list[bytes | str | int]] = []
        admits: list[tuple[ModelVersion, list[Any]]] = []
        holding = len(self._pending)
        for (mv, level, shape), queued in outbox.items():
            stream = keys.request_stream(mv.name, mv.version)
            counter = keys.queue_count(mv.name, mv.version)
            self._round += [((mv, level, shape), q, f) for q, f in queued]
            for group in self._groups(mv, queued):
                command: list[bytes | str | int] = [
                    "EVALSHA", self._sha_enqueue, 2, stream, counter, len(group),
                    mv.settings.queue_policy.max_queue_size,
                ]
                for field, value in group_fields(gw, now_ns, level, shape, [q for q, _ in group], holding).items():
                    command += (field, value)
                commands.append(command)
                admits.append((mv, [f for _, f in group]))
        for mv, corrs in cancels.items():
            command = ["XADD", keys.request_stream(mv.name, mv.version), "*"]
            for field, value in cancel_fields(gw, corrs).items():
                command += (field, value)
            commands.append(command)
            admits.append((mv, []))
        return commands, admits

    async def _submitter(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._last_flush = asyncio.get_running_loop().time()
            self._last_group = sum(len(q) for q in self._outbox.values())
            commands, admits = self._commands()
            try:
                if await self._round_trip(commands, admits):
                    continue
                await asyncio.sleep(0.05)  # put back (Redis unreachable): sent again shortly
                self._ready.set()
            except Exception:
                log.exception("queueing requests failed")
                for _, futures in admits:
                    for fut in futures:
                        if fut is not None:
                            _fail(fut, Unavailable("could not queue the request (gateway error; see its log)"))
            finally:
                self._round = []
                self._round_cancels = {}

    async def _round_trip(self, commands: list[list[bytes | str | int]],
                          admits: list[tuple[ModelVersion, list[Any]]]) -> bool:
        """Send one round and settle its futures; False if it was put back to be sent again."""
        try:
            sent_at = time.perf_counter()
            replies = await self._resp.execute(commands, raise_errors=False)
            self._rtt.observe(time.perf_counter() - sent_at)
            if any(isinstance(r, Exception) and str(r).startswith("NOSCRIPT") for r in replies):
                # Redis restarted since the scripts were loaded: nothing ran; load and resend.
                await scripts.load_all(self._resp)
                replies = await self._resp.execute(commands, raise_errors=False)
            if busy := next((r for r in replies if is_transient(r)), None):
                # Loading its data, failing over: like an outage, retried for a while.
                raise RedisBusy(str(busy))
        except REDIS_DOWN as exc:
            if self._retry_later(exc):
                return False
            replies = [unavailable(self.settings.redis_url, exc)] * len(commands)
        else:
            self._down_since = None
        self._resend_if_reconnected()
        for (mv, futures), reply in zip(admits, replies, strict=True):
            if isinstance(reply, int) and reply < 0:
                err: FerryError | None = ResourceExhausted(
                    f"the queue of model {mv.name!r} v{mv.version} is full: {-1 - reply} requests wait, "
                    f"max_queue_size is {mv.settings.queue_policy.max_queue_size}; retry later, "
                    "add workers, or raise max_queue_size in its config.pbtxt"
                )
            elif isinstance(reply, FerryError):
                err = reply
            elif isinstance(reply, Exception):
                log.error("queueing %d requests failed: %s", len(futures), reply)
                err = Unavailable(f"could not queue the request: {reply}")
            else:
                err = None
            if err is not None:
                for fut in futures:
                    if fut is not None:  # None: a re-sent copy; the first may have made it
                        _fail(fut, err)
        return True

    def _retry_later(self, exc: BaseException) -> bool:
        """Redis is unreachable: put this round back to be sent again shortly, unless Redis has
        been unreachable for redis_timeout_s already (then the round fails with UNAVAILABLE).
        Riding out a blip (a restart, a failover) beats failing every call made during it."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._down_since is None:
            self._down_since = now
            log.warning("redis unreachable queueing requests (%s); retrying for up to %.1fs", exc,
                        self.settings.redis_timeout_s)
        if now - self._down_since >= self.settings.redis_timeout_s:
            return False
        for where, q, fut in self._round:
            if fut is None or not fut.done():
                self._outbox[where].append((q, fut))
        for mv, corrs in self._round_cancels.items():
            self._cancels[mv] += corrs
        return True

    def _resend_if_reconnected(self) -> None:
        """If the submitter's or the listener's connection is a new one, queue again every request
        still waiting, except the ones not sent yet and the round in flight.  A replaced submitter
        connection may have lost what it wrote (a restart, a failover); a replaced listener
        connection may have lost replies it had popped but not read (a connection dropped with a
        reply in transit, e.g. by ferry.resp_sentinel).  A re-sent request that was not lost is
        answered twice, and the second reply dropped.  Runs after each round and each heartbeat."""
        now = (self._resp.connections, self._listen.connections)
        before, self._connection = self._connection, now
        if now == before:
            return
        if now[0] != before[0]:
            # The server behind the new connection may not have this gateway's alive key (a failover
            # to a replica that lagged, a restart without persistence): workers drop replies to a
            # gateway without one, so say it is alive now rather than at the next heartbeat.
            beat = asyncio.get_running_loop().create_task(self._heartbeat_once(), name="heartbeat-now")
            self._tasks.append(beat)
            beat.add_done_callback(self._tasks.remove)
        if not any(old and new != old for old, new in zip(before, now, strict=True)):
            return  # first connections: nothing went out on an earlier one
        fresh = {q.corr for _, q, _ in self._round} | {q.corr for out in self._outbox.values() for q, _ in out}
        again = [(where, queued) for corr, (where, queued) in self._inflight.items()
                 if corr not in fresh and not self._pending[corr].done()]
        for where, queued in again:
            self._outbox[where].append((queued, None))
        if again:
            metrics.RESENT.inc(len(again))
            log.warning("Redis connection replaced: queueing %d waiting request(s) again, in case Redis lost them",
                        len(again))
            self._ready.set()

    async def _listener(self) -> None:
        # Redis 7's BLMPOP waits and then pops everything queued in one round trip.
        # Redis 6.2 (what pip-installable builds ship) has only LPOP with a count,
        # so there an empty list costs a second, blocking BLPOP.
        backoff = 0.05
        listen = self._listen
        while True:
            try:
                bundles: Any
                if self._blmpop:
                    popped = await listen.call("BLMPOP", LISTEN_BLOCK_S, 1, self.reply_key, "LEFT",
                                               "COUNT", POP_COUNT)
                    bundles = popped[1] if popped else ()
                else:
                    bundles = await listen.call("LPOP", self.reply_key, POP_COUNT)
                    if not bundles:
                        popped = await listen.call("BLPOP", self.reply_key, LISTEN_BLOCK_S)
                        bundles = [popped[1]] if popped else ()
                if listen.connections != self._connection[1]:
                    self._resend_if_reconnected()
                backoff = 0.05
            except REDIS_DOWN as exc:
                log.warning("reply listener: redis unreachable (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:
                # Without the listener every call would hang: log, back off, go on.
                log.exception("reply listener failed; retrying")
                await asyncio.sleep(0.5)
                continue
            pending = self._pending
            for bundle in bundles:
                for corr, code, body in iter_replies(bundle):
                    fut = pending.get(corr)
                    if fut is None or fut.done():
                        self.late_replies += 1
                        metrics.DROPPED_REPLIES.inc()
                    else:
                        fut.set_result((code, body))
