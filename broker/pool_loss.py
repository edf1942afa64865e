"""What the broker does when a pool has no live worker.

Three cases, each checked by every dispatch round (broker.dispatch):

* **Requests nobody can run.**  A model none of whose pools has had a live worker for
  ``no_worker_grace_s`` fails its queued requests with UNAVAILABLE, naming the pools and how to
  start a worker; a shorter gap (a worker restarting) only delays them.
* **Batches stranded on a dead pool.**  Batches this broker put on a pool's stream that then lost
  every worker move to another pool of their model that can take them, or fail with UNAVAILABLE once
  none has had a worker for the grace period.  (A batch handed over in-process is not on a stream:
  the worker that has it is the broker's own process.)
* **Waking a pool.**  A pool with no live worker that a model needs gets its wake-up signal
  (keys.wake_list) raised: at once when none of the model's pools is live, else once the model's
  requests have waited ``WAKE_AFTER_S`` beyond every dispatch round (its live pools are full).  An
  autoscaler (the Helm chart's KEDA trigger) starts a worker on it; the pool's workers clear it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker import keys, scripts
from broker.handoff import Settling
from broker.messages import encode_reply, parse_batch
from broker.pools import Pool, route
from broker.requests import Rejection
from broker.served import Served, release
from ferry.errors import Code
from ferry.resp import DataClient, range_entries

log = logging.getLogger("ferry.broker")

WAKE_AFTER_S = 0.5  # a backlog this old wakes a model's idle pools while another of its pools is live
WAKE_EVERY_S = 1.0  # the wake-up signal is refreshed at most this often per pool

Commands = list[list[bytes | str | int]]


class PoolLoss:
    def __init__(self, models: dict[bytes, Served], pools: dict[str, Pool], writes: DataClient,
                 workers: Callable[[str], int], room: Callable[[Pool], float], grace_s: float) -> None:
        self._models = models
        self._pools = pools
        self._writes = writes
        self._workers = workers  # live workers of a pool
        self._room = room  # batches a pool can take now
        self.grace_s = grace_s

    def unserved(self, model: Served, now: float, drain: bool, settling: Settling) -> list[tuple[Served, Rejection]]:
        """The requests of ``model`` that fail now because none of its pools has had a live worker
        for the grace period (released into ``settling``)."""
        if any(self._workers(p.name) > 0 for p, _ in model.options):
            model.unserved_since = None
            return []
        if drain:
            return []
        if not model.sched.live:
            if not self._stranded(model):
                model.unserved_since = None  # nobody waits: the next request starts a new wait
            return []
        if model.unserved_since is None:
            model.unserved_since = now
        if now - model.unserved_since < self.grace_s:
            return []
        message = model.no_worker_message()
        out = [(model, Rejection(r, message, Code.UNAVAILABLE)) for r in model.sched.drop_all()]
        for _, rej in out:
            release(model, rej.request, settling)
        return out

    def _stranded(self, model: Served) -> bool:
        """Whether batches of ``model`` sit on a pool of it that has no live worker."""
        key = model.stream.encode()
        return any(v[4] == key for pool, _ in model.options if self._workers(pool.name) == 0
                   for v in pool.unfinished.values())

    async def rescue(self, now: float) -> None:
        """Move or fail the batches this broker put on pools that have lost every worker."""
        dead = [pool for pool in self._pools.values() if pool.unfinished and self._workers(pool.name) == 0]
        if not dead:
            return
        wanted = [(pool, entry_id) for pool in dead for entry_id in pool.on_stream()]
        if not wanted:
            return
        found = await self._writes.execute([["XRANGE", pool.stream, entry_id, entry_id] for pool, entry_id in wanted])
        commands: Commands = []
        moved: list[tuple[Pool, int, float, bytes]] = []
        failed: list[tuple[str, bytes]] = []
        for (pool, entry_id), reply in zip(wanted, found, strict=True):
            entries = range_entries(reply)
            if not entries:  # finished after all (its notice was lost) or deleted
                pool.unfinished.pop(entry_id, None)
                continue
            _, rows, _, _, model_key = pool.unfinished[entry_id]
            model = self._models.get(model_key)
            fields = entries[0][1]
            choice = None if model is None else route(
                model.options, workers=self._workers, room=self._room, formed=lambda _: (), now=now, urgent=None)
            if choice is not None:
                xadd: list[bytes | str | int] = ["XADD", choice.pool.stream, "*"]
                for f, v in fields.items():
                    xadd += (f, v)
                commands.append(xadd)
                # Its expected compute is the new pool's, not the dead one's.
                moved.append((choice.pool, rows, choice.latency.compute(rows), model_key))
            elif model is None or (model.unserved_since is not None and now - model.unserved_since >= self.grace_s):
                message = model.no_worker_message() if model else "its model is no longer served"
                failed += [(m.gateway, encode_reply(m.corr, Code.UNAVAILABLE, message.encode()))
                           for m in parse_batch(fields)[3]]
            else:
                if model.unserved_since is None:
                    model.unserved_since = now
                continue
            commands += scripts.settle_entries(pool.stream, [entry_id])
            pool.unfinished.pop(entry_id, None)
        commands += scripts.push_reply_commands(failed)
        if not commands:
            return
        replies = await self._writes.execute(commands)
        xadds = iter(r for r, c in zip(replies, commands, strict=True) if c[0] == "XADD")
        for (pool, rows, compute, model_key), new_id in zip(moved, xadds, strict=False):
            pool.dispatched(new_id, now, rows, compute, self._workers(pool.name), model_key)
        if moved or failed:
            log.warning("pool(s) %s lost every worker: %d batch(es) moved to another pool, %d request(s) "
                        "failed with UNAVAILABLE", ", ".join(p.name for p in dead), len(moved), len(failed))

    def wake_commands(self, now: float) -> Commands:
        """Raise the wake-up signal of the pools with no live worker that a model needs now."""
        commands: Commands = []
        wanted = {pool.name: pool for pool in self._pools.values()
                  if pool.unfinished and self._workers(pool.name) == 0}  # batches stranded on it
        for model in self._models.values():
            if not model.sched.live:
                model.backlog_since = None
                continue
            if model.backlog_since is None:
                model.backlog_since = now
            idle = [p for p, _ in model.options if self._workers(p.name) == 0]
            if idle and (len(idle) == len(model.options) or now - model.backlog_since >= WAKE_AFTER_S):
                wanted |= {p.name: p for p in idle}
        for pool in wanted.values():
            if now - pool.woke_at >= WAKE_EVERY_S:
                pool.woke_at = now
                wake = keys.wake_list(pool.name)
                commands += [["LPUSH", wake, 1], ["LTRIM", wake, 0, 0], ["PEXPIRE", wake, keys.WAKE_TTL_MS]]
                log.info("pool %s has no live worker and requests wait for it: raising its wake-up signal",
                         pool.name)
        return commands
