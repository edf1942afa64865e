"""Throughput and latency sweep: perf_analyzer against Ferry, a plain grpc.aio server, and the ceiling.

    .venv/bin/python benchmarks/sweep.py            # writes docs/benchmarks.md

What it measures, on this machine, in one run:

* Ferry: ``ferry up`` (Redis on a Unix socket, broker, one CPU worker, gateway)
  serving the example MLP; perf_analyzer sends batch-1 gRPC requests at
  concurrency 1, 2, 4 ... 64.
* plain: ``benchmarks/plain_server.py``, a grpc.aio server running the same
  model in-process, one request per model call (no Redis, no batching).
* ceiling: in-process onnxruntime (one intra-op thread) at batch 1 ... 64,
  with no RPC at all.

perf_analyzer comes from ``benchmarks/install_perf_analyzer.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ferry.cluster import free_port  # noqa: E402

LEVELS = [1, 2, 4, 8, 16, 32, 64]


def perf_analyzer() -> str:
    """$PERF_ANALYZER, else perf_analyzer on PATH, else the private install (benchmarks/install_perf_analyzer.sh)."""
    found = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if found:
        return found
    out = subprocess.run([str(ROOT / "benchmarks" / "install_perf_analyzer.sh")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def wait_port(url: str, timeout_s: float = 60) -> None:
    import grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            grpc.channel_ready_future(grpc.insecure_channel(url)).result(timeout=1)
            return
        except grpc.FutureTimeoutError:
            time.sleep(0.2)
    raise TimeoutError(url)


def sweep(pa: str, url: str, levels: list[int], interval_ms: int) -> list[dict[str, float]]:
    rows = []
    for c in levels:
        with tempfile.NamedTemporaryFile(suffix=".csv") as f:
            proc = subprocess.run(
                [pa, "-m", "mlp", "-u", url, "-i", "grpc", "--concurrency-range", f"{c}:{c}",
                 "--measurement-interval", str(interval_ms), "--stability-percentage", "25",
                 "--max-trials", "6", "-f", f.name],
                capture_output=True, text=True, timeout=300,
            )
            if proc.returncode != 0:
                print(proc.stdout[-1500:], proc.stderr[-1500:], file=sys.stderr)
                rows.append({"concurrency": c, "throughput": float("nan"), "p50_ms": float("nan"),
                             "p99_ms": float("nan")})
                continue
            rec = next(csv.DictReader(open(f.name)))
        row = {"concurrency": c, "throughput": float(rec["Inferences/Second"]),
               "p50_ms": float(rec["p50 latency"]) / 1000, "p99_ms": float(rec["p99 latency"]) / 1000}
        print(f"  c={c:3d} {row['throughput']:8.0f}/s p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:6.2f} ms",
              flush=True)
        rows.append(row)
    return rows


@contextlib.contextmanager
def ferry_cluster(workers: int, env_extra: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")} | env_extra
    up = subprocess.Popen([sys.executable, "-m", "ferry.cli", "up", "--grpc-port", str(port), "--workers",
                           str(workers)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from ferry.cluster import wait_ready

        if not wait_ready(f"127.0.0.1:{port}", 60):
            raise RuntimeError("ferry up did not become ready")
        yield f"127.0.0.1:{port}"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


@contextlib.contextmanager
def plain_server() -> Iterator[str]:
    port = free_port()
    srv = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "plain_server.py"), "--port", str(port)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        srv.terminate()
        srv.wait(30)


def median_rows(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per concurrency level, the run with the median throughput (its latencies go with it)."""
    rows = []
    for level_runs in zip(*runs, strict=True):
        ok = sorted((r for r in level_runs if r["throughput"] == r["throughput"]), key=lambda r: r["throughput"])
        pick = dict(ok[len(ok) // 2]) if ok else dict(level_runs[0])
        pick["min"] = ok[0]["throughput"] if ok else float("nan")
        pick["max"] = ok[-1]["throughput"] if ok else float("nan")
        rows.append(pick)
    return rows


def run_ceiling(batches: list[int], seconds: float = 1.5) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from ferry.example_model import build_onnx

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(build_onnx(), opts, providers=["CPUExecutionProvider"])
    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, 256)).astype(np.float32)
        for _ in range(20):
            sess.run(None, {"INPUT0": x})
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sess.run(None, {"INPUT0": x})
            n += 1
        dt = time.perf_counter() - t0
        rows.append({"batch": b, "throughput": n * b / dt, "latency_ms": dt / n * 1000})
        print(f"  batch {b:3d} {n * b / dt:9.0f}/s {dt / n * 1000:6.3f} ms/call", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| concurrency | inferences/s (median) | range of runs | p50 ms | p99 ms |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['throughput']:.0f} | {r['min']:.0f} to {r['max']:.0f} | {r['p50_ms']:.2f} "
              f"| {r['p99_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels")
    ap.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer measurement window")
    ap.add_argument("--workers", type=int, default=1, help="Ferry CPU workers")
    ap.add_argument("--max-queue-delay-us", type=int, default=None,
                    help="override the example model's batching window (FERRY_MAX_QUEUE_DELAY_US)")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per server; tables show the median")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    pa = perf_analyzer()
    env = {} if args.max_queue_delay_us is None else {"FERRY_MAX_QUEUE_DELAY_US": str(args.max_queue_delay_us)}
    print("ceiling: in-process onnxruntime, 1 thread")
    ceiling = run_ceiling(levels)
    ferry_runs: list[list[dict[str, float]]] = []
    plain_runs: list[list[dict[str, float]]] = []
    # Both servers stay up and are measured in turn, so slow phases of a shared
    # machine hit both alike; each figure is the median of --repeat runs.
    with contextlib.ExitStack() as stack:
        ferry_url = stack.enter_context(ferry_cluster(args.workers, env))
        plain_url = None if args.skip_plain else stack.enter_context(plain_server())
        for rep in range(args.repeat):
            print(f"ferry (run {rep + 1})")
            ferry_runs.append(sweep(pa, ferry_url, levels, args.interval_ms))
            if plain_url:
                print(f"plain grpc.aio server (run {rep + 1})")
                plain_runs.append(sweep(pa, plain_url, levels, args.interval_ms))
    ferry = median_rows(ferry_runs)
    plain = median_rows(plain_runs) if plain_runs else []
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    peak_f = max(ferry, key=lambda r: r["throughput"])
    body = f"""# Benchmarks

Regenerate with `.venv/bin/python benchmarks/sweep.py` (about fifteen minutes).
The three tables below ran on one machine in one run ({time.strftime("%Y-%m-%d")}):
{os.cpu_count()} cores ({model}), {platform.system()}.
The client (perf_analyzer, batch-1 gRPC requests, `-i grpc`, synchronous calls) shares those cores
with the servers, as it does in every figure here. Ferry and the plain server were measured in turn,
{args.repeat} sweeps each; each row is the median run (its p50/p99 go with it) and the range of the runs.

Model: the bundled example MLP 256→1024→1024→10 FP32 (`ferry example-model`), max_batch_size 32,
batching window {args.max_queue_delay_us if args.max_queue_delay_us is not None else "from config.pbtxt"} µs.
Ferry: `ferry up` — Redis (Unix socket), one broker, {args.workers} CPU worker(s) with one intra-op thread,
one gateway; every request crosses Redis twice.

## Ferry

{table(ferry)}

Peak: {peak_f['throughput']:.0f} inferences/s at concurrency {peak_f['concurrency']}.

## Plain grpc.aio server (no Redis, no batching; `benchmarks/plain_server.py`)

{table(plain) if plain else "(skipped)"}

## Ceiling: in-process onnxruntime, one thread, no RPC

| batch | inferences/s | ms per call |
|---:|---:|---:|
""" + "\n".join(f"| {r['batch']} | {r['throughput']:.0f} | {r['latency_ms']:.3f} |" for r in ceiling) + "\n"
    args.out.parent.mkdir(exist_ok=True)
    marker = "<!-- notes below are kept by benchmarks/sweep.py -->"
    notes = ""
    if args.out.exists() and marker in args.out.read_text():
        notes = args.out.read_text().split(marker, 1)[1]
    args.out.write_text(body + "\n" + marker + notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
