"""Throughput as gateway and worker processes are added, and where each request's CPU goes.

    .venv/bin/python benchmarks/scale.py            # prints markdown tables (about four minutes)

For each (gateways, workers) layout it starts ``ferry up --gateways G --workers W`` (a layout written
``eGxW`` adds ``--edge``: G native edges in front of the G gateways) and drives it with
perf_analyzer at ``--concurrency``; for every layout it also reads the CPU time of each process from /proc
over a window in the middle of the run (as ``benchmarks/cpu_per_request.py`` does) and divides by the
requests served. Those per-request costs are what docs/benchmarks.md's cluster projection is built from:
a component's capacity is (cores given to it) / (CPU seconds per request), and Redis, single-threaded,
gets one core per shard.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_per_request import measure  # noqa: E402
from benchmarks.sweep import perf_analyzer  # noqa: E402
from ferry.cluster import free_port, wait_ready  # noqa: E402

ROLES = ("edge", "gateway", "broker", "worker", "broker+worker", "redis-server", "perf_analyzer")


@contextlib.contextmanager
def cluster(gateways: int, workers: int, edge: bool = False) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}
    env["FERRY_METRICS_PORT"] = "-1"
    up = subprocess.Popen([sys.executable, "-m", "ferry.cli", "up", "--grpc-port", str(port), "--gateways",
                           str(gateways), "--workers", str(workers), *(["--edge"] if edge else [])], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_ready(f"127.0.0.1:{port}", 60):
            raise RuntimeError("ferry up did not become ready")
        time.sleep(1)  # the other gateways: each binds before it reports ready, give them a moment
        yield f"127.0.0.1:{port}"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2",
                    help="GATEWAYSxWORKERS, comma-separated; an e in front (e1x1) puts native edges in front")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    pa = perf_analyzer()
    print(f"{os.cpu_count()} cores; perf_analyzer at concurrency {args.concurrency} on the same cores\n")
    print("| front end | gateways | workers | inferences/s | p99 ms | " + " | ".join(f"{r} µs/req" for r in ROLES)
          + " | total µs/req |")
    print("|---|---:|---:|---:|---:|" + "---:|" * (len(ROLES) + 1))
    for layout in args.layouts.split(","):
        edge = layout.startswith("e")
        g, w = (int(x) for x in layout.removeprefix("e").split("x"))
        with cluster(g, w, edge) as url:
            rate, p99, cores = measure(pa, url, "mlp", args.concurrency, args.seconds)
        us = {role: c * 1e6 / rate for role, c in cores.items()}
        cells = " | ".join(f"{us.get(r, 0):.0f}" for r in ROLES)
        front = "edge + gateway" if edge else "gateway"
        print(f"| {front} | {g} | {w} | {rate:,.0f} | {p99:.1f} | {cells} | {sum(us.values()):.0f} |", flush=True)


if __name__ == "__main__":
    main()
