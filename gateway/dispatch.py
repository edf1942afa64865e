"""Queue requests on Redis and match replies back to waiting calls.

Two long-lived tasks keep Redis work per request far below one round trip:

* the *submitter* sends everything queued since its last round trip in one
  pipeline, as one request group per model version (split at
  max_batch_size rows).  Under load it sends at most once per
  ``flush_interval_us``, so one XADD carries many requests and every process
  downstream wakes up less often; under light load (requests arrive one per
  round trip) a request leaves at once;
* the *listener* pops this gateway's reply list in bulk (BLMPOP ... COUNT, or
  LPOP ... COUNT on Redis 6.2; each element is a bundle of replies) and resolves each call's future by
  correlation number.

A reply for a call that already gave up (deadline, cancel) finds no future
and is dropped and counted, so late replies never leak.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from typing import Any

from broker import keys
from broker.messages import Stat, group_fields, iter_replies
from ferry.errors import DeadlineExceeded, FerryError, Unavailable
from ferry.redis_conn import REDIS_DOWN, connect, unavailable
from ferry.repository import ModelVersion
from ferry.resp import RespClient
from ferry.settings import GatewaySettings

log = logging.getLogger("ferry.gateway")

LISTEN_BLOCK_S = 1.0
POP_COUNT = 256

Reply = tuple[int, bytes]
_Queued = tuple[int, int, bytes, "asyncio.Future[Reply]"]  # corr, rows, payload, future


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
        self._resp = RespClient(settings.redis_url, settings.redis_timeout_s)
        self._listen = RespClient(settings.redis_url, settings.redis_timeout_s + LISTEN_BLOCK_S)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._corr = itertools.count(1)
        self._outbox: dict[ModelVersion, list[_Queued]] = defaultdict(list)
        self._ready = asyncio.Event()
        self._last_flush = 0.0
        self._last_group = 0
        self._interval = settings.flush_interval_us / 1e6
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._blmpop = False
        self.late_replies = 0

    async def start(self) -> None:
        try:
            version = (await self.redis.info("server")).get("redis_version", "0")
            self._blmpop = int(str(version).split(".")[0]) >= 7
        except REDIS_DOWN as exc:
            log.warning("cannot read the Redis version (%s); assuming Redis 6.2", exc)
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._submitter(), name="submitter"),
            asyncio.create_task(self._listener(), name="listener"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]

    async def _heartbeat_once(self) -> None:
        try:
            await self.redis.set(self.alive_key, b"1", px=keys.HEARTBEAT_TTL_MS)
        except Exception as exc:  # down, or refusing writes (OOM): try again next beat
            log.warning("gateway heartbeat failed: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(keys.HEARTBEAT_INTERVAL_S)
            await self._heartbeat_once()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            # Alive first: from then on workers drop replies instead of pushing them.
            await self.redis.delete(self.alive_key)
            await self.redis.delete(self.reply_key)
        except REDIS_DOWN:
            pass  # both expire on their own
        if self.late_replies:
            log.info("dropped %d replies whose calls had already ended (deadline or cancel)", self.late_replies)
        await self.redis.aclose()
        await self._resp.close()
        await self._listen.close()

    async def submit(self, mv: ModelVersion, rows: int, payload: bytes, timeout_s: float) -> Reply:
        """Queue one validated request; wait for its (code, body) reply."""
        corr = next(self._corr)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        self._pending[corr] = fut
        self._outbox[mv].append((corr, rows, payload, fut))
        # Under light load (the last round trip carried a single request, or none
        # was sent for a whole interval) a request leaves at once; otherwise it
        # waits at most one interval for others to share its round trip.
        if self._last_group < 2 or loop.time() - self._last_flush >= self._interval:
            self._ready.set()
        elif self._timer is None:
            self._timer = loop.call_later(self._interval, self._ready.set)
        timer = loop.call_later(timeout_s, _expire, fut, mv, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()
            del self._pending[corr]

    def count_failure(self, mv: ModelVersion, ns: int) -> None:
        """Add a failed request to the model's statistics, without waiting (best effort)."""
        key = keys.stats_hash(mv.name, mv.version)
        sent = self._resp.send_now([["HINCRBY", key, Stat.FAIL_COUNT, 1], ["HINCRBY", key, Stat.FAIL_NS, ns]])
        if sent is not None:
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _groups(self, mv: ModelVersion, queued: list[_Queued]) -> list[list[_Queued]]:
        limit = mv.settings.max_batch_size
        if limit == 0:
            return [[q] for q in queued]
        groups: list[list[_Queued]] = [[]]
        rows = 0
        for q in queued:
            if rows + q[1] > limit:
                groups.append([])
                rows = 0
            groups[-1].append(q)
            rows += q[1]
        return groups

    async def _submitter(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._last_flush = asyncio.get_running_loop().time()
            self._last_group = sum(len(q) for q in self._outbox.values())
            outbox, self._outbox = self._outbox, defaultdict(list)
            now_ns = time.time_ns()
            commands: list[list[bytes | str]] = []
            futures = []
            for mv, queued in outbox.items():
                stream = keys.request_stream(mv.name, mv.version)
                for group in self._groups(mv, queued):
                    requests = [(c, r, p) for c, r, p, _ in group]
                    command: list[bytes | str] = ["XADD", stream, "*"]
                    for field, value in group_fields(self.settings.gateway_id, now_ns, requests).items():
                        command += (field, value)
                    commands.append(command)
                futures += [q[3] for q in queued]
            try:
                await self._resp.execute(commands)
            except Exception as exc:
                if isinstance(exc, REDIS_DOWN):
                    err: FerryError = unavailable(self.settings.redis_url, exc)
                else:
                    log.exception("queueing %d requests failed", len(futures))
                    err = Unavailable(f"could not queue the request: {exc}")
                for fut in futures:
                    _fail(fut, err)

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
                    else:
                        fut.set_result((code, body))
