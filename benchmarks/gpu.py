"""GPU pool benchmark: perf_analyzer against Ferry with an onnx-gpu worker, a CPU worker beside it.

    python benchmarks/gpu.py --json gpu.json      # on a machine with onnxruntime-gpu and a GPU

Each setup is its own cluster (Redis on a Unix socket, broker, worker(s), gateway) serving the
example MLP (max batch 32), swept by perf_analyzer with batch-1 gRPC requests:

* ``gpu``: one worker ``--pool gpu`` (onnx-gpu: CUDA provider, IOBinding), model on ``KIND_GPU``;
* ``gpu-graph``: the same with ``--cuda-graph`` and ``ferry.batch_sizes "32"`` (every batch padded
  to 32 and replayed from one captured CUDA graph);
* ``cpu``: one worker ``--pool cpu`` (onnx-cpu, one intra-op thread), for scale on the same machine.

``--edge`` puts the native edge (gateway/edge, built by scripts/build-edge; ``$FERRY_EDGE_BINARY``
names another) in front of the gateway, as ``ferry up --edge`` does: perf_analyzer talks to the edge,
the Python gateway listens on a private loopback port behind it, and the broker takes the edge's
batching defaults (``ferry.cluster.EDGE_BATCHING``). One Python gateway carries ~4,000-6,000/s, so
without the edge every worker looks alike; the rows are then named ``<setup>-edge``.

scripts/gpu-check runs this after the CUDA tests. Needs ``perf_analyzer`` (``--perf-analyzer``,
default: on PATH, else benchmarks/install_perf_analyzer.sh) and ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sweep import median_rows, perf_analyzer, sweep, table  # noqa: E402
from ferry.cluster import edge_batching, edge_binary, free_port, start_redis, wait_ready  # noqa: E402
from ferry.example_model import write_repository  # noqa: E402

BATCH_32 = 'parameters { key: "ferry.batch_sizes" value: { string_value: "32" } }\n'
# name -> (instance kind, extra config lines, worker flags, workers)
SETUPS: dict[str, tuple[str, str, tuple[str, ...], int]] = {
    "gpu": ("KIND_GPU", "", ("--pool", "gpu"), 1),
    "gpu-graph": ("KIND_GPU", BATCH_32, ("--pool", "gpu", "--cuda-graph"), 1),
    "cpu": ("KIND_CPU", "", ("--pool", "cpu"), 1),
}


def repository(root: Path, kind: str, extra: str) -> Path:
    write_repository(root)
    config = root / "mlp" / "config.pbtxt"
    config.write_text(config.read_text().replace("KIND_CPU", kind) + extra)
    return root


@contextlib.contextmanager
def cluster(repo: Path, worker_flags: tuple[str, ...], workers: int, logdir: Path, name: str,
            edge: str | None = None) -> Iterator[str]:
    """Redis, broker, workers and one gateway; with ``edge`` (the binary) the native edge in front."""
    redis = start_redis(unix_socket=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}
    env |= {"FERRY_REDIS_URL": redis.url, "FERRY_MODEL_REPOSITORY": str(repo), "FERRY_METRICS_PORT": "-1",
            "PYTHONUNBUFFERED": "1"}
    port = free_port()
    # Behind the edge the gateway listens on a private port and the broker batches as `ferry up --edge` has it.
    gateway_port = free_port() if edge else port
    broker_env = env | edge_batching(env) if edge else env
    roles: list[tuple[str, tuple[str, ...]]] = [
        ("broker", ()), *[("worker", worker_flags)] * workers,
        ("gateway", ("--grpc-port", str(gateway_port), "--host", "127.0.0.1"))]
    if edge:
        roles.append(("edge", ("--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{gateway_port}",
                               "--redis-url", redis.url)))
    procs = []
    try:
        for i, (role, flags) in enumerate(roles):
            log = open(logdir / f"{name}-{i}-{role}.log", "wb")  # closed with the process, below
            cmd = [edge, *flags] if edge and role == "edge" else [sys.executable, "-m", "ferry.cli", role, *flags]
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=broker_env if role == "broker" else env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
        deadline = time.monotonic() + 120
        while not wait_ready(f"127.0.0.1:{port}", 1):
            dead = [(role, p.returncode) for (role, _), (p, _) in zip(roles, procs, strict=True)
                    if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not ready; exited: {dead or 'none'} (logs in {logdir})")
        yield f"127.0.0.1:{port}"
    finally:
        for proc, log in reversed(procs):  # edge, gateway, then workers, then the broker
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("--levels", default="1,8,64", help="perf_analyzer concurrency levels")
    ap.add_argument("--interval-ms", type=int, default=1500, help="perf_analyzer measurement window")
    ap.add_argument("--perf-analyzer", default=None,
                    help="perf_analyzer binary (default: $PERF_ANALYZER, PATH, else install)")
    ap.add_argument("--logs", type=Path, default=None, help="keep component logs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--edge", action="store_true",
                    help="the native edge in front of the gateway (scripts/build-edge, or $FERRY_EDGE_BINARY)")
    args = ap.parse_args()
    edge = edge_binary() if args.edge else None  # a missing build fails here, before any cluster starts
    pa = args.perf_analyzer or perf_analyzer()
    levels = [int(c) for c in args.levels.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ferry-gpu-bench-") as tmp:
        logdir = args.logs or Path(tmp) / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        for setup in args.setups.split(","):
            kind, extra, flags, workers = SETUPS[setup]
            name = f"{setup}-edge" if edge else setup
            repo = repository(Path(tmp) / name, kind, extra)
            print(f"{name}: worker {' '.join(flags)} x{workers}, front end {'edge + ' if edge else ''}gateway",
                  flush=True)
            try:
                with cluster(repo, flags, workers, logdir, name, edge) as url:
                    results[name] = median_rows([sweep(pa, url, levels, args.interval_ms)])
            except RuntimeError as exc:  # one setup failing (e.g. CUDA graph capture) must not hide the rest
                print(f"{name}: FAILED: {exc}", flush=True)
                results[name] = []
    for name, rows in results.items():
        print(f"\n### {name}\n\n{table(rows) if rows else 'failed (see the logs)'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
