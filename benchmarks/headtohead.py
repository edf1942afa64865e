"""Head to head: two servers on the same core at the same time, each under its own perf_analyzer.

    .venv/bin/python benchmarks/headtohead.py --a ferry-edge --b triton
    .venv/bin/python benchmarks/headtohead.py --a ferry-edge@/tmp/before --b ferry-edge --rounds 6

This shared VM's speed drifts by 20-30% within minutes, so two servers measured one after the other
(benchmarks/compare.py, even ``--interleave``) differ by more than most changes do.  Here both run
at once, every process of both on CPU 0, and both perf_analyzers on CPU 1: a slow minute slows
both alike.  Over the same window each server's CPU time (every process it started, from /proc)
divided by the inferences it served is its **CPU per inference**; the ratio b/a of the two is what
this reports, per round and as the median.  On a saturated core that ratio is what decides
throughput when each has the core to itself (throughput there is 1 / CPU per inference), within
what sharing changes: each server has about half the core, so its batches form at about half the
rate (the rows per batch are shown).  Two copies of the same server read 0.98-1.01.

A peer is one of benchmarks/compare.py's (``ferry-edge``, ``triton``, ...), the Ferry ones
optionally from another checkout (``ferry-edge@DIR``: that tree's code, its own edge build if it
has one) and with settings in its environment (``ferry-edge,FERRY_GATHER_US=500,GOGC=800``).  Which one starts first
alternates by round.

``--latency`` answers the other question, what a change does to one call's latency: both servers
up at once on CPU 0 as above, and one client on CPU 1 that sends single calls, one at a time, to
each in turn, ``--calls`` per segment, alternating which goes first.  It reports each segment's
p50 and p99 (client side, in microseconds) and the median of the paired p50 ratios b/a.  The
idle one costs the other about a percent of the core.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import EXTERNAL, FERRY, PEERS, serve  # noqa: E402
from benchmarks.sweep import perf_analyzer  # noqa: E402

SERVER_CPU, CLIENT_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Peer:
    label: str
    name: str  # a benchmarks/compare.py peer
    root: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)


def parse_peer(spec: str) -> Peer:
    """``name[@checkout][,KEY=value...]``"""
    head, *settings = spec.split(",")
    name, _, where = head.partition("@")
    if name not in PEERS:
        raise argparse.ArgumentTypeError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    if (where or settings) and name not in FERRY:
        raise argparse.ArgumentTypeError(f"{spec!r}: only Ferry peers take a checkout or settings")
    env = {}
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq or not key.isupper():
            raise argparse.ArgumentTypeError(f"{spec!r}: settings are KEY=value (environment), not {s!r}")
        env[key] = value
    root = Path(where).resolve() if where else ROOT
    if not (root / "ferry" / "cli.py").exists():
        raise argparse.ArgumentTypeError(f"{spec!r}: {root} is not a Ferry checkout")
    return Peer(spec, name, root, env)


def cpu_ticks(pid: int) -> int:
    """User + system CPU of ``pid`` and every process below it, in clock ticks."""
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parent[int(entry)] = int(stat[1])
        used[int(entry)] = int(stat[11]) + int(stat[12])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree and p not in tree}
        grew = bool(more)
        tree |= more
    return sum(used.get(p, 0) for p in tree)


def counts(url: str) -> tuple[int, int]:
    """(inferences, model executions) the server has counted for mlp (the ModelStatistics RPC)."""
    import grpc

    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(url) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name="mlp"), timeout=10)
    stats = reply.model_stats[0]
    return int(stats.inference_count), int(stats.execution_count)


@dataclass
class Side:
    rate: float  # inferences/s
    rows: float  # per model execution
    cpu_us: float  # per inference

    @property
    def busy(self) -> float:
        """CPU used per second of the window, in cores."""
        return self.rate * self.cpu_us / 1e6


def one_round(pa: str, peers: list[Peer], args: argparse.Namespace, log_dir: Path, onnx: Path) -> list[Side]:
    with contextlib.ExitStack() as stack:
        urls, procs = [], []
        for p in peers:
            started: list[subprocess.Popen[bytes]] = []
            urls.append(stack.enter_context(
                serve(p.name, args, SERVER_CPU, onnx, log_dir, root=p.root, ferry_env=p.env, started=started)))
            procs.append(started[0])
        window_ms = int((args.warmup_s + args.seconds + 10) * 1000)
        loads = [subprocess.Popen(["taskset", "-c", str(CLIENT_CPU), pa, "-m", "mlp", "-u", url, "-i", "grpc",
                                   "--concurrency-range", f"{args.concurrency}:{args.concurrency}",
                                   "--measurement-interval", str(window_ms), "--max-trials", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for url in urls]
        try:
            time.sleep(args.warmup_s)
            before = [(counts(u), cpu_ticks(p.pid)) for u, p in zip(urls, procs, strict=True)]
            start = time.monotonic()
            time.sleep(args.seconds)
            after = [(counts(u), cpu_ticks(p.pid)) for u, p in zip(urls, procs, strict=True)]
            took = time.monotonic() - start
        finally:
            for load in loads:
                load.kill()
                load.wait()
    sides = []
    for ((n0, e0), c0), ((n1, e1), c1) in zip(before, after, strict=True):
        served = n1 - n0
        if served <= 0:
            raise RuntimeError("a server served nothing in the window (see the logs in " + str(log_dir) + ")")
        sides.append(Side(served / took, served / max(1, e1 - e0), (c1 - c0) / CLK_TCK * 1e6 / served))
    return sides


def _request() -> bytes:
    """One batch-1 ModelInfer for the example model, serialised once (no client-side protobuf per call)."""
    import numpy as np

    from ferry.example_model import EXAMPLE_MODEL, INPUT, LAYERS
    from protos import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=EXAMPLE_MODEL)
    tensor = req.inputs.add(name=INPUT, datatype="FP32")
    tensor.shape.extend([1, LAYERS[0]])
    req.raw_input_contents.append(np.random.default_rng(0).random((1, LAYERS[0]), dtype=np.float32).tobytes())
    return req.SerializeToString()


def latency(peers: list[Peer], args: argparse.Namespace, log_dir: Path, onnx: Path) -> None:
    import grpc

    body = _request()
    p50: list[list[float]] = [[], []]
    p99: list[list[float]] = [[], []]
    with contextlib.ExitStack() as stack:
        cpu = None if args.unpinned else SERVER_CPU
        urls = [stack.enter_context(serve(p.name, args, cpu, onnx, log_dir, root=p.root, ferry_env=p.env))
                for p in peers]
        if not args.unpinned:
            os.sched_setaffinity(0, {CLIENT_CPU})  # before the channels: gRPC's threads inherit it
        calls = [stack.enter_context(grpc.insecure_channel(u)).unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None)
                 for u in urls]
        for call in calls:
            for _ in range(args.calls):
                call(body, timeout=10)
        for seg in range(args.segments):
            for i in (0, 1) if seg % 2 == 0 else (1, 0):
                took = []
                for _ in range(args.calls):
                    t0 = time.perf_counter_ns()
                    calls[i](body, timeout=10)
                    took.append(time.perf_counter_ns() - t0)
                took.sort()
                p50[i].append(took[len(took) // 2] / 1e3)
                p99[i].append(took[min(len(took) - 1, int(len(took) * 0.99))] / 1e3)
            print(f"segment {seg + 1}: a p50 {p50[0][-1]:6.0f} p99 {p99[0][-1]:6.0f} us | "
                  f"b p50 {p50[1][-1]:6.0f} p99 {p99[1][-1]:6.0f} us", flush=True)
    ratios = [b / a for a, b in zip(*p50, strict=True)]
    print(f"median p50 a {statistics.median(p50[0]):.0f} us, b {statistics.median(p50[1]):.0f} us; "
          f"median p99 a {statistics.median(p99[0]):.0f} us, b {statistics.median(p99[1]):.0f} us; "
          f"p50 b/a median {statistics.median(ratios):.3f} (b lower in {sum(r < 1 for r in ratios)} of {len(ratios)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=parse_peer, default=parse_peer("ferry-edge"), help="the reference")
    ap.add_argument("--b", type=parse_peer, default=parse_peer("triton"), help="compared with --a")
    ap.add_argument("--concurrency", type=int, default=64, help="perf_analyzer's, for each server")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per round")
    ap.add_argument("--warmup-s", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=4, help="the first server alternates by round")
    ap.add_argument("--solo", action="store_true",
                    help="each server alone on CPU 0 in turn (the usual pinned measurement, with its CPU use)")
    ap.add_argument("--latency", action="store_true",
                    help="one call at a time, alternating between the two servers (see above)")
    ap.add_argument("--segments", type=int, default=20, help="--latency: segments per server")
    ap.add_argument("--unpinned", action="store_true", help="--latency: servers and client on any CPU")
    ap.add_argument("--calls", type=int, default=300, help="--latency: calls per segment (and to warm up)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay-us", type=int, default=2000)
    ap.add_argument("--start-timeout-s", type=float, default=180)
    args = ap.parse_args()
    # What benchmarks/compare.py's serve() reads: one gateway and one worker, every peer as it starts.
    args.ferry_gateways, args.ferry_workers, args.sched_batch_all = 1, 1, False
    if args.latency and args.solo:
        ap.error("--latency keeps both servers up at once; it has no --solo")
    if args.unpinned and not args.latency:
        ap.error("--unpinned is for --latency (CPU per inference needs the servers on one CPU)")
    if args.segments < 1 or args.calls < 1:
        ap.error("--segments and --calls must be at least 1")
    if (os.cpu_count() or 1) < 2:
        ap.error("needs 2 CPUs: the servers share CPU 0, the clients CPU 1")
    for p in (args.a, args.b):
        if p.name in EXTERNAL:
            importlib.import_module(f"benchmarks.peers.{p.name}").setup(ROOT / ".cache" / "peers" / p.name)
    from ferry.example_model import build_onnx

    log_dir = Path(tempfile.mkdtemp(prefix="ferry-h2h-"))
    onnx = log_dir / "mlp.onnx"
    onnx.write_bytes(build_onnx())
    if args.latency:
        print(f"a = {args.a.label}, b = {args.b.label}; one call at a time, {args.segments} segments of "
              f"{args.calls} calls each; logs in {log_dir}", flush=True)
        latency([args.a, args.b], args, log_dir, onnx)
        return
    pa = perf_analyzer()
    print(f"a = {args.a.label}, b = {args.b.label}; c={args.concurrency} each, {args.seconds:.0f} s a round; "
          f"logs in {log_dir}", flush=True)
    ratios = []
    for r in range(args.rounds):
        order = [args.a, args.b] if r % 2 == 0 else [args.b, args.a]
        if args.solo:
            sides = [one_round(pa, [p], args, log_dir, onnx)[0] for p in order]
        else:
            sides = one_round(pa, order, args, log_dir, onnx)
        a, b = (sides[0], sides[1]) if r % 2 == 0 else (sides[1], sides[0])
        ratios.append(b.cpu_us / a.cpu_us)
        print(f"round {r + 1} ({order[0].label} first): " + " | ".join(
            f"{n} {x.rate:6.0f}/s {x.rows:4.1f} rows/batch {x.cpu_us:6.1f} us/inference, {x.busy:4.0%} of a core"
            for n, x in (("a", a), ("b", b))) + f" | b/a {ratios[-1]:.3f}", flush=True)
    print(f"median CPU per inference b/a: {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
