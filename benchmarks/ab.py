"""Before/after, closed loop: perf_analyzer against this tree and an earlier commit, alternating.

    .venv/bin/python benchmarks/ab.py --before 2782294                  # c = 1, 8, 32, 64, two rounds
    .venv/bin/python benchmarks/ab.py --before HEAD~3 --levels 8 --rounds 3 --set FERRY_GATHER_US=0
    .venv/bin/python benchmarks/ab.py --before HEAD~1 --edge --pin        # ferry up --edge, one core each

The earlier commit is checked out into a temporary git worktree; both trees run
``ferry up --workers 1`` with the example model from this checkout's virtual
environment, side by side.  For each round and concurrency the two clusters are
measured one after the other (perf_analyzer ``--concurrency-range c:c``, 3 s
windows), so the slow and fast moments of a shared machine hit both alike.
Prints every run and a markdown table with all rounds.  ``--set`` applies to the
*after* cluster only (to compare a knob against the old default); ``--set-both``
to both.  ``--edge`` runs ``ferry up --edge`` in both trees with this checkout's
edge binary (scripts/build-edge, or $FERRY_EDGE_BINARY), so only the Python side
differs.  ``--pin`` puts both clusters on CPU 0 and perf_analyzer on CPU 1, the
pinned layout of benchmarks/compare.py (the idle cluster costs only heartbeats).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from slo import perf_analyzer, server_ready  # noqa: E402

from ferry.cluster import edge_binary, free_port  # noqa: E402

SERVER_CPU = ["taskset", "-c", "0"]  # --pin: as benchmarks/compare.py pins a server and its client
CLIENT_CPU = ["taskset", "-c", "1"]


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ferry-ab-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), rev], cwd=ROOT, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)


@contextlib.contextmanager
def cluster(tree: Path, env_extra: dict[str, str], log: Path, *, edge: str | None = None,
            pin: bool = False) -> Iterator[str]:
    port, repo = free_port(), tempfile.mkdtemp(prefix="ferry-ab-models-")
    ferry = [sys.executable, "-m", "ferry.cli"]  # cwd=tree: that tree's ferry package
    subprocess.run([*ferry, "example-model", repo], cwd=tree, check=True, stdout=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")} | env_extra
    front: list[str] = []
    if edge:
        env["FERRY_EDGE_BINARY"] = edge
        front = ["--edge"]
    with open(log, "wb") as out:
        up = subprocess.Popen([*(SERVER_CPU if pin else []), *ferry, "up", "--grpc-port", str(port), "--workers", "1",
                               "--model-repository", repo, *front],
                              cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            address = f"127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while not server_ready(address, 1.0):
                if up.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ferry up in {tree} did not start; see {log}")
            time.sleep(1)
            yield address
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(120)


def measure(pa: str, address: str, concurrency: int, interval_ms: int, pin: bool = False
            ) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        proc = subprocess.run([*(CLIENT_CPU if pin else []), pa, "-m", "mlp", "-u", address, "-i", "grpc",
                               "--concurrency-range", f"{concurrency}:{concurrency}",
                               "--measurement-interval", str(interval_ms), "--percentile=99", "--max-trials", "3",
                               "--stability-percentage", "1000", "-f", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed: {(proc.stdout + proc.stderr)[-500:]}")
        row = next(csv.DictReader(out.open()))
        return float(row["Inferences/Second"]), float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--levels", default="1,8,32,64", help="concurrency levels")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--interval-ms", type=int, default=3000)
    ap.add_argument("--set", action="append", default=[], metavar="FERRY_KNOB=VALUE", help="for the after cluster")
    ap.add_argument("--set-both", action="append", default=[], metavar="FERRY_KNOB=VALUE", help="for both clusters")
    ap.add_argument("--edge", action="store_true", help="ferry up --edge in both trees, with this checkout's edge")
    ap.add_argument("--pin", action="store_true", help="clusters on CPU 0, perf_analyzer on CPU 1")
    args = ap.parse_args()
    edge = edge_binary() if args.edge else None  # a missing build fails here, before any cluster starts
    levels = [int(x) for x in args.levels.split(",")]
    both = dict(kv.split("=", 1) for kv in args.set_both)
    after_env = both | dict(kv.split("=", 1) for kv in args.set)
    pa = perf_analyzer()
    logs = Path(tempfile.mkdtemp(prefix="ferry-ab-logs-"))
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with worktree(args.before) as old, \
            cluster(old, both, logs / "before.log", edge=edge, pin=args.pin) as before, \
            cluster(ROOT, after_env, logs / "after.log", edge=edge, pin=args.pin) as after:
        for _ in range(args.rounds):
            for c in levels:
                for name, address in (("before", before), ("after", after)):
                    r = measure(pa, address, c, args.interval_ms, args.pin)
                    results.setdefault((name, c), []).append(r)
                    print(f"{name:>6} c={c:<3} {r[0]:7.0f}/s p50 {r[1]:6.2f} ms p99 {r[2]:6.2f} ms", flush=True)
    layout = ", ".join(x for x in ("ferry up --edge" if edge else "", "pinned" if args.pin else "") if x)
    title = f"\nbefore = {args.before}, after = this tree {' '.join(args.set)}".rstrip()
    print(title + (f" ({layout})" if layout else ""))
    print("\n| concurrency | before /s | after /s | before p50 / p99 ms | after p50 / p99 ms |")
    print("|---:|---:|---:|---:|---:|")
    for c in levels:
        cells = []
        for name in ("before", "after"):
            cells.append(", ".join(f"{r[0]:,.0f}" for r in results[(name, c)]))
        for name in ("before", "after"):
            cells.append(", ".join(f"{r[1]:.2f} / {r[2]:.1f}" for r in results[(name, c)]))
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
