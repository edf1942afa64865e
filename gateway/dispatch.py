"""Queue requests on Redis and match replies back to waiting calls.

Two long-lived tasks keep Redis round trips per request below one:

* the *submitter* sends every request queued since its last round trip as one
  pipeline of XADDs (under load, dozens of requests per round trip);
* the *listener* pops this gateway's reply list in bulk (LPOP ... COUNT) and
  resolves each call's future by correlation number.

A reply for a call that already gave up (deadline, cancel) finds no future
and is dropped and counted, so late replies never leak.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from broker import keys
from broker.messages import decode_reply, request_fields
from ferry.errors import DeadlineExceeded, Unavailable
from ferry.redis_conn import REDIS_DOWN, connect, unavailable
from ferry.repository import ModelVersion
from ferry.settings import GatewaySettings

log = logging.getLogger("ferry.gateway")

LISTEN_BLOCK_S = 1.0
POP_COUNT = 1024

Reply = tuple[int, bytes]


class Dispatcher:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.reply_key = keys.reply_list(settings.gateway_id)
        self.redis = connect(settings.redis_url, settings.redis_timeout_s)
        self._listen_redis = connect(settings.redis_url, settings.redis_timeout_s, blocking_s=LISTEN_BLOCK_S)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._corr = itertools.count(1)
        self._outbox: list[tuple[str, dict[bytes, bytes], asyncio.Future[Reply]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.late_replies = 0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._submitter(), name="submitter"),
            asyncio.create_task(self._listener(), name="listener"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.delete(self.reply_key)
        except REDIS_DOWN:
            pass  # the list's TTL removes it
        await self.redis.aclose()
        await self._listen_redis.aclose()

    async def submit(self, mv: ModelVersion, rows: int, payload: bytes, timeout_s: float) -> Reply:
        """Queue one validated request; wait for its (code, body) reply."""
        corr = next(self._corr)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        fields = request_fields(self.reply_key, corr, rows, time.time_ns(), payload)
        self._outbox.append((keys.request_stream(mv.name, mv.version), fields, fut))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from model {mv.name!r} v{mv.version} within {timeout_s:.3f}s"
            ) from None
        finally:
            self._pending.pop(corr, None)

    async def _submitter(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outbox = self._outbox, []
            if not batch:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for stream, fields, _ in batch:
                pipe.xadd(stream, fields)
            try:
                await pipe.execute()
            except REDIS_DOWN as exc:
                err = unavailable(self.settings.redis_url, exc)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
            except Exception as exc:
                log.exception("queueing %d requests failed", len(batch))
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(Unavailable(f"could not queue the request: {exc}"))

    async def _listener(self) -> None:
        # LPOP with a count drains everything queued in one round trip; only an
        # empty list costs a blocking BLPOP.  (BLMPOP would do both, but needs
        # Redis 7; this works from 6.2, the Redis that pip-installable builds ship.)
        backoff = 0.05
        redis = self._listen_redis
        while True:
            try:
                items: Any = await redis.lpop(self.reply_key, POP_COUNT)
                if not items:
                    popped = await redis.blpop([self.reply_key], LISTEN_BLOCK_S)
                    items = [popped[1]] if popped else ()
                backoff = 0.05
            except REDIS_DOWN as exc:
                log.warning("reply listener: redis unreachable (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            pending = self._pending
            for raw in items:
                corr, code, body = decode_reply(raw)
                fut = pending.get(corr)
                if fut is None or fut.done():
                    self.late_replies += 1
                else:
                    fut.set_result((code, body))
