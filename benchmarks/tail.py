"""Where a server's tail latency comes from: every request's own latency, from perf_analyzer.

    .venv/bin/python benchmarks/tail.py --a ferry-edge@/tmp/before --b ferry-edge --concurrency 8 --rounds 3
    .venv/bin/python benchmarks/tail.py --a ferry-edge --b triton --concurrency 8,16

Each server in turn, alone, every process of it on CPU 0 and perf_analyzer on CPU 1 (as
benchmarks/compare.py's pinned mode), one closed-loop perf_analyzer run per server, level and
round, with ``--profile-export-file``: the send and answer time of every request. From those it
prints what the summary percentiles hide:

* throughput, p50, p90, p99 and p99.9 over every request of the run (perf_analyzer's own
  summary covers its last windows only);
* **slow clusters**: the requests at or over the p99, grouped by start time (within 5 ms of the
  previous one). Clusters of about the concurrency are whole rounds that stalled (the server or
  the client stopped), ones and twos are requests that missed their batch and waited for the
  next;
* **silences**: gaps between consecutive answers over 2 ms, and how many of the slow requests
  span one;
* **answer bursts**: answers less than 0.2 ms apart count as one burst (about one batch, as the
  client saw it), with their sizes;
* **hot stretches**: the run cut into 0.25 s stretches by send time; the share of the slow
  requests sent in the busiest twentieth of them, when those began, and the p99 of every other
  request. Stalls that recur at the same moments of every run, for every server (perf_analyzer's
  own work on the client's core, most likely), show up here rather than as a server's tail.

``--hidden 16`` serves every peer a narrow version of the example MLP (the same inputs and
outputs, 18 KB of weights instead of 5.3 MB): what a server costs a call when the model neither
takes time nor evicts the server's own code and data from the caches.

Peers are benchmarks/headtohead.py's (``name[@checkout][,KEY=value...]``); the order alternates by
round. ``--keep DIR`` keeps the exports (JSON, perf_analyzer's format) for a closer look; without
it each is deleted once analysed (one run at concurrency 64 writes about 800 MB).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compare import EXTERNAL, pin, serve  # noqa: E402
from benchmarks.headtohead import CLIENT_CPU, SERVER_CPU, Peer, parse_peer  # noqa: E402
from benchmarks.sweep import perf_analyzer  # noqa: E402
from ferry.example_model import LAYERS  # noqa: E402

SLOW_CLUSTER_S = 0.005
SILENCE_S = 0.002
BURST_S = 0.0002
STRETCH_S = 0.25


def run_one(pa: str, peer: Peer, level: int, args: argparse.Namespace, log_dir: Path, onnx: Path,
            export: Path) -> None:
    with serve(peer.name, args, SERVER_CPU, onnx, log_dir, root=peer.root, ferry_env=peer.env,
               hidden=args.hidden) as url:
        proc = subprocess.run(
            [*pin(CLIENT_CPU), pa, "-m", "mlp", "-u", url, "-i", "grpc", "--concurrency-range", f"{level}:{level}",
             "--measurement-interval", str(args.interval_ms), "--stability-percentage", "1000",
             "--max-trials", str(args.windows), "--profile-export-file", str(export)],
            capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed: {(proc.stdout + proc.stderr)[-600:]}")


def analyse(export: Path) -> dict[str, Any]:
    """The figures above, from one perf_analyzer export."""
    requests = json.loads(export.read_text())["experiments"][-1]["requests"]
    sent = np.array([r["timestamp"] for r in requests], dtype=np.int64)
    answered = np.array([r["response_timestamps"][-1] for r in requests], dtype=np.int64)
    order = np.argsort(sent)
    sent, answered = sent[order], answered[order]
    latency_ms = (answered - sent) / 1e6
    span_s = (answered.max() - sent.min()) / 1e9
    p99 = float(np.percentile(latency_ms, 99))
    clusters: list[list[int]] = []
    for i in np.flatnonzero(latency_ms >= p99):
        if clusters and sent[i] - sent[clusters[-1][-1]] < SLOW_CLUSTER_S * 1e9:
            clusters[-1].append(int(i))
        else:
            clusters.append([int(i)])
    answers = np.sort(answered)
    gaps = np.diff(answers)
    silences = [(answers[i], answers[i + 1]) for i in np.flatnonzero(gaps >= SILENCE_S * 1e9)]
    spanning = sum(any(sent[i] <= a and b <= answered[i] for a, b in silences) for c in clusters for i in c)
    bursts = np.diff(np.flatnonzero(np.diff(answers, prepend=0, append=answers[-1] + 10**9) > BURST_S * 1e9))
    stretch = ((sent - sent[0]) // int(STRETCH_S * 1e9)).astype(np.int64)
    slow_per_stretch = np.bincount(stretch, weights=latency_ms >= p99)
    hot = np.argsort(slow_per_stretch)[::-1][:max(1, len(slow_per_stretch) // 20)]
    outside = ~np.isin(stretch, hot)
    return {
        "requests": len(latency_ms), "rate": len(latency_ms) / span_s,
        **{f"p{q}": float(np.percentile(latency_ms, q)) for q in (50, 90, 99, 99.9)},
        "slow": sum(len(c) for c in clusters), "clusters": sorted((len(c) for c in clusters), reverse=True),
        "silences": len(silences), "slow_in_silence": spanning,
        "bursts": len(bursts), "burst_sizes": np.bincount(bursts).tolist(),
        "hot_share": float(slow_per_stretch[hot].sum() / max(1.0, slow_per_stretch.sum())),
        "hot_at": sorted(float(h) * STRETCH_S for h in hot),
        "p99_outside_hot": float(np.percentile(latency_ms[outside], 99)) if outside.any() else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=parse_peer, default=parse_peer("ferry-edge"))
    ap.add_argument("--b", type=parse_peer, default=None, help="a second server, measured in turn with --a")
    ap.add_argument("--concurrency", default="8", help="comma-separated levels")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer's window")
    ap.add_argument("--windows", type=int, default=3, help="perf_analyzer windows per run")
    ap.add_argument("--keep", type=Path, default=None, help="keep the exports here")
    ap.add_argument("--hidden", type=int, default=LAYERS[1],
                    help="the example MLP's hidden width, every server (small: Python's and the servers' own "
                    "cost without the model's 5 MB of weights evicting their caches)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay-us", type=int, default=2000)
    ap.add_argument("--start-timeout-s", type=float, default=180)
    args = ap.parse_args()
    # What benchmarks/compare.py's serve() reads: one gateway and one worker, every peer as it starts.
    args.ferry_gateways, args.ferry_workers, args.sched_batch_all = 1, 1, False
    levels = [int(c) for c in args.concurrency.split(",")]
    peers = [args.a] + ([args.b] if args.b else [])
    for p in peers:
        if p.name in EXTERNAL:
            importlib.import_module(f"benchmarks.peers.{p.name}").setup(ROOT / ".cache" / "peers" / p.name)
    from ferry.example_model import build_onnx

    log_dir = Path(tempfile.mkdtemp(prefix="ferry-tail-"))
    keep = args.keep or log_dir
    keep.mkdir(parents=True, exist_ok=True)
    onnx = log_dir / "mlp.onnx"
    onnx.write_bytes(build_onnx(hidden=args.hidden))
    pa = perf_analyzer()
    kept = f"exports in {keep}, " if args.keep else ""
    print(f"{' / '.join(p.label for p in peers)}; pinned; {kept}logs in {log_dir}", flush=True)
    for level in levels:
        for r in range(args.rounds):
            sides = list(zip("ab", peers, strict=False))
            for side, peer in sides[::-1] if r % 2 else sides:
                export = keep / f"tail-c{level}-r{r + 1}-{side}.json"
                run_one(pa, peer, level, args, log_dir, onnx, export)
                f = analyse(export)
                if args.keep is None:
                    export.unlink()
                print(f"c={level} round {r + 1} {side} {f['rate']:7.0f}/s p50 {f['p50']:5.2f} p90 {f['p90']:5.2f} "
                      f"p99 {f['p99']:5.2f} p99.9 {f['p99.9']:5.2f} ms | slow {f['slow']} in {len(f['clusters'])} "
                      f"clusters (largest {f['clusters'][:6]}), {f['slow_in_silence']} spanning one of "
                      f"{f['silences']} silences | bursts {f['bursts']} sizes {f['burst_sizes'][:17]} | "
                      f"{100 * f['hot_share']:.0f}% of slow in hot stretches at {f['hot_at']} s, p99 outside "
                      f"{f['p99_outside_hot']:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
