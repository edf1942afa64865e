"""What the broker holds per served model version: its stream, scheduler, pools and unacknowledged entries.

Built once from the repository and the broker's settings (``serve``); the broker's tasks share these
objects on one event loop.  A request entry read from a model's stream holds a group of requests
(broker.messages); ``group_requests`` turns one into the scheduler's ``Request``s, and ``release``
counts each off as it leaves the queue, so the entry is acknowledged (scripts.ACK_REQUESTS) once all
of its requests are handled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from broker import keys
from broker.handoff import Settling
from broker.latency import LatencyModel
from broker.messages import GROUP_STRIDE, Group
from broker.pools import Pool
from broker.requests import QUEUED, Entry, Request
from broker.scheduler import ModelScheduler
from ferry.repository import ModelVersion, Repository
from ferry.settings import BrokerSettings


@dataclass(eq=False)
class Served:
    """One model version as the broker serves it (it also satisfies broker.handoff.Acks)."""

    mv: ModelVersion
    stream: str
    counter: str
    sched: ModelScheduler
    # The pools it may run on, cheapest first, each with its latency model for this model.
    options: list[tuple[Pool, LatencyModel]] = field(default_factory=list)
    done: list[Entry] = field(default_factory=list)  # entries to acknowledge in the next round
    held: set[bytes] = field(default_factory=set)  # ids of entries read and not yet acknowledged
    unserved_since: float | None = None  # since when no pool of it has had a live worker
    backlog_since: float | None = None  # since when requests have waited after every dispatch round

    @property
    def labels(self) -> tuple[str, str]:
        return self.mv.name, str(self.mv.version)

    def latency_on(self, pool: str) -> LatencyModel | None:
        return next((lat for p, lat in self.options if p.name == pool), None)

    def no_worker_message(self) -> str:
        pools = [p.name for p, _ in self.options]
        return (f"model {self.mv.name!r} v{self.mv.version} has no live worker in pool(s) {', '.join(pools)}; "
                f"start one with `ferry worker --pool {pools[0]}`")


def serve(settings: BrokerSettings, repo: Repository) -> tuple[dict[bytes, Served], dict[str, Pool]]:
    """Every version in ``repo``, keyed by its request stream's name, and the pools they run on."""
    models: dict[bytes, Served] = {}
    pools: dict[str, Pool] = {}
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
            just_in_time=settings.just_in_time,
            return_wait_s=settings.return_wait_us / 1e6,
            preferred=s.preferred_batch_sizes,
            static_sizes=s.static_batch_sizes,
            starvation_limit=settings.starvation_limit,
        )
        model = Served(mv, keys.request_stream(mv.name, mv.version), keys.queue_count(mv.name, mv.version), sched)
        for choice in s.pools:
            pool = pools.setdefault(choice.name, Pool(choice.name, keys.pool_stream(choice.name)))
            model.options.append((pool, LatencyModel()))
        models[model.stream.encode()] = model
    return models, pools


def release(model: Served, req: Request, settling: Settling | None = None) -> None:
    """A request left the queue, handled by the write ``settling`` is building (None: it needs no
    write, a cancellation); its entry is acknowledged once all of its requests are handled."""
    if settling is not None:
        settling.settle(model, req)
        return
    entry = req.entry
    entry.remaining -= 1
    if entry.remaining == 0 and entry.settling == 0 and not entry.acked:
        entry.acked = True
        model.done.append(entry)


def group_requests(g: Group, entry_id: bytes, now: float, wall_ns: int, levels: int, *,
                   taken_over: bool = False) -> list[Request]:
    """A request group's requests as the scheduler queues them, sharing one Entry (acknowledged
    once all have left the queue); wall-clock deadlines become monotonic ones on this clock."""
    payloads = g.payloads
    n = len(payloads)
    entry = Entry(entry_id, n, n)
    flat = g.members
    gateway, enqueued_ns, level, shape = g.gateway, g.enqueued_ns, min(g.level, levels - 1), g.shape
    traces = g.traces or [""] * n
    inf = math.inf
    out = []
    for i in range(n):  # once per request: flat indexing, positional arguments
        k = i * GROUP_STRIDE
        deadline_ns, timeout_ns = flat[k + 2], flat[k + 3]
        out.append(Request(entry, gateway, flat[k], flat[k + 1], enqueued_ns, now,
                           now + (deadline_ns - wall_ns) / 1e9 if deadline_ns else inf,
                           now + (timeout_ns - wall_ns) / 1e9 if timeout_ns else inf,
                           level, shape, payloads[i], QUEUED, False, 0.0, 0, traces[i], taken_over))
    return out


def wall_ns(deadline: float, now: float) -> int:
    """A monotonic deadline as wall-clock ns for the worker (0 = none)."""
    if deadline == math.inf:
        return 0
    return time.time_ns() + int((deadline - now) * 1e9)
