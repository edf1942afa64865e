"""The broker's Python cost per request, without Redis or a cluster: one request group read, queued,
formed into a batch and written as a batch entry, in a loop on one thread.

    .venv/bin/python benchmarks/broker_path.py                 # groups of 25 requests, no deadlines
    .venv/bin/python benchmarks/broker_path.py --requests 12 --deadline-ms 50

It runs the real code (broker.messages, broker.scheduler) on a hot cache, so it measures the
instructions a change adds or removes; under load the broker's CPU per request is several times
this (wake-ups, a cold cache on a shared core: benchmarks/cpu_per_request.py measures that).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.messages import Member, Queued, batch_fields, group_fields, parse_group
from broker.scheduler import ModelScheduler
from broker.served import group_requests


def one_group(sched: ModelScheduler, fields: dict[bytes, bytes]) -> None:
    """What the broker does for one group: Broker._take_in, then one dispatch round's batch."""
    now, wall = time.monotonic(), time.time_ns()
    g = parse_group(fields)
    n = len(g.payloads)
    for req in group_requests(g, b"1-1", now, wall, levels=1):
        sched.add(req)
    sched.expire(now)
    batch = sched.take(now)
    if len(batch) != n:
        raise SystemExit(f"expected one batch of {n}, got {len(batch)}: raise --max-batch")
    members = [Member(r.gateway, r.corr, r.rows, r.enqueued_ns, 0, r.payload, r.trace) for r in batch]
    xadd: list[bytes | str] = ["XADD", "pool", "*"]
    for f, v in batch_fields("mlp", 1, "", members).items():
        xadd += (f, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=25, help="requests per group (the edge sends groups)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--deadline-ms", type=float, default=0, help="each request's deadline (0 = none)")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    deadline_ns = time.time_ns() + int(args.deadline_ms * 1e6) if args.deadline_ms else 0
    payload = bytes(1100)  # about the example MLP's request
    queued = [Queued(i, 1, deadline_ns, 0, payload) for i in range(args.requests)]
    fields = group_fields("gw-1", time.time_ns(), 0, "", queued, 64)
    sched = ModelScheduler("mlp", max_batch_size=args.max_batch)
    for _ in range(1000):
        one_group(sched, fields)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        for _ in range(100):
            one_group(sched, fields)
        n += 100
    per = (time.perf_counter() - t0) / (n * args.requests) * 1e6
    print(f"{per:.2f} us per request ({args.requests} per group, {n} groups)")


if __name__ == "__main__":
    main()
