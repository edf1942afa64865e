"""Side by side: Ferry, Triton, MLServer, Ray Serve (and a plain grpc.aio server) on this machine.

    .venv/bin/python benchmarks/compare.py          # installs the peers, measures, writes docs/benchmarks.md

Every server serves the same model (the example MLP 256→1024→1024→10 FP32, onnxruntime on the CPU,
one intra-op thread, one model instance) with the same batching settings (at most ``--max-batch`` rows
per model call, waiting at most ``--delay-us`` to fill one), and each is measured by the same
perf_analyzer sweep (batch-1 gRPC requests, closed loop, concurrency 1..64):

* ``ferry``: ``ferry up`` (Redis on a Unix socket, broker, worker, gateway; ``--ferry-gateways``
  and ``--ferry-workers`` add processes), adaptive batching (its default); ``ferry-edge``: the same
  with the native edge in front (``ferry up --edge``; build it first with scripts/build-edge);
  ``ferry-fixed``: ``ferry`` with Triton's batching rule (``FERRY_BATCH_WINDOW=fixed``);
* ``triton``: the ``tritonserver`` binary and python backend bundled in PyPI's nvidia-pytriton
  (``benchmarks/peers/triton.py``); its dynamic batcher, one python-backend instance running onnxruntime;
* ``mlserver``: MLServer with adaptive batching and a small onnxruntime runtime, plus the ModelConfig
  RPC perf_analyzer needs, added by the harness outside the inference path (``benchmarks/peers/mlserver.py``);
* ``rayserve``: Ray Serve's gRPC ingress and ``@serve.batch`` (``benchmarks/peers/rayserve.py``);
* ``plain``: ``benchmarks/plain_server.py``, grpc.aio with the model in-process, no batching: the
  cost of a Python gRPC front end alone.

Modes: ``pinned`` runs the server (every process of it) on CPU 0 and perf_analyzer on CPU 1, so each
side has one core; ``unpinned`` lets the kernel place everything. Peers are measured one after the
other, each ``--repeat`` times in turn, because this shared VM drifts by 20-30% within minutes:
compare figures within one run only. ``--interleave`` goes further: every peer of a mode runs at once
(idle, the others cost the measured one only their background wake-ups) and each level is measured
peer after peer, the order rotating each sweep, so a slow minute hits every peer at that level.

Each peer gets its own virtual environment under ``.cache/peers/<name>`` (pinned versions; first run
downloads about 1 GB, mostly Ray). Results also go to ``--json``; plots to ``docs/img/peers-*.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sweep import median_rows, perf_analyzer  # noqa: E402
from ferry.cluster import free_port  # noqa: E402
from ferry.example_model import LAYERS  # noqa: E402

PEERS = ("ferry", "ferry-edge", "ferry-fixed", "triton", "mlserver", "rayserve", "plain")
FERRY = ("ferry", "ferry-edge", "ferry-fixed")
EXTERNAL = {"triton", "mlserver", "rayserve"}  # the ones with a module in benchmarks/peers
LEVELS = (1, 2, 4, 8, 16, 32, 64)
BEGIN, END = "<!-- benchmarks/compare.py: begin -->", "<!-- benchmarks/compare.py: end -->"
Row = dict[str, float]


def pin(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def cpus(mode: str) -> tuple[int | None, int | None]:
    """(server CPU, perf_analyzer CPU): pinned, one core each; unpinned, wherever the kernel puts them."""
    return (0, 1) if mode == "pinned" else (None, None)


def wait_model_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until ModelReady("mlp") answers true: every peer implements it, and it is what perf_analyzer needs."""
    import grpc

    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pbg

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(url) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            with contextlib.suppress(grpc.RpcError):
                if stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=2).ready:
                    return
            time.sleep(0.25)
    raise TimeoutError(f"{url}: model mlp not ready within {timeout_s:.0f}s")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def serve(peer: str, args: argparse.Namespace, cpu: int | None, onnx: Path, log_dir: Path, *,
          root: Path = ROOT, ferry_env: dict[str, str] | None = None,
          started: list[subprocess.Popen[bytes]] | None = None, hidden: int = LAYERS[1]) -> Iterator[str]:
    """Start one peer (pinned to ``cpu`` if given) and yield its gRPC address once its model is ready.
    For benchmarks/headtohead.py: a Ferry peer can run from another checkout (``root``) with more
    in its environment (``ferry_env``), and ``started`` gets the server's process. ``hidden``: the
    example MLP's width for a Ferry peer, which writes its own repository; it must match ``onnx``,
    what the other peers serve."""
    port = free_port()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix=f"cmp-{peer}-") as tmp:
        work = Path(tmp)
        if peer in FERRY:
            from ferry.example_model import write_repository

            repo = write_repository(work / "models", hidden=hidden)
            cfg = repo / "mlp" / "config.pbtxt"
            cfg.write_text(cfg.read_text()
                           .replace("max_batch_size: 32", f"max_batch_size: {args.max_batch}")
                           .replace("max_queue_delay_microseconds: 0",
                                    f"max_queue_delay_microseconds: {args.delay_us}"))
            env = {k: v for k, v in env.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}
            env["FERRY_METRICS_PORT"] = "-1"
            if root != ROOT and not (root / ".cache" / "edge" / "ferry-edge").exists():
                env["FERRY_EDGE_BINARY"] = str(ROOT / ".cache" / "edge" / "ferry-edge")
            env["FERRY_BATCH_WINDOW"] = "fixed" if peer == "ferry-fixed" else "adaptive"
            env.update(ferry_env or {})
            argv = [sys.executable, "-m", "ferry.cli", "up", "--model-repository", str(repo), "--grpc-port",
                    str(port), "--workers", str(args.ferry_workers), "--gateways", str(args.ferry_gateways),
                    *(["--edge"] if peer == "ferry-edge" else [])]
        elif peer == "plain":
            argv = [sys.executable, str(ROOT / "benchmarks" / "plain_server.py"), "--port", str(port)]
        else:
            module: Any = importlib.import_module(f"benchmarks.peers.{peer}")
            (work / "srv").mkdir()
            argv = module.serve_command(ROOT / ".cache" / "peers" / peer, work / "srv", port, onnx,
                                        args.max_batch, args.delay_us)
        with open(log_dir / f"{peer}.log", "ab") as log:
            # `ferry up` picks its scheduling policy itself (ferry.cluster.batch_scheduling).
            policy = ["chrt", "--batch", "0"] if args.sched_batch_all and peer not in FERRY else []
            proc = subprocess.Popen([*policy, *pin(cpu), *argv], cwd=root if peer in FERRY else ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if started is not None:
                started.append(proc)
            try:
                wait_model_ready(f"127.0.0.1:{port}", proc, args.start_timeout_s)
                yield f"127.0.0.1:{port}"
            finally:
                stop(proc)


def measure(pa: str, url: str, level: int, args: argparse.Namespace, cpu: int | None) -> Row:
    """One perf_analyzer run at ``level``. A server whose windows never agree within 25% is measured
    again accepting any spread (``unstable`` = 1 in its row, starred in the tables) rather than dropped."""
    nan = float("nan")
    failed: Row = {"concurrency": level, "throughput": nan, "p50_ms": nan, "p99_ms": nan}
    for stability, unstable in (("25", 0.0), ("1000", 1.0)):
        with tempfile.NamedTemporaryFile(suffix=".csv") as f:
            try:
                proc = subprocess.run(
                    [*pin(cpu), pa, "-m", "mlp", "-u", url, "-i", "grpc", *(["--streaming"] if args.streaming else []),
                     "--concurrency-range", f"{level}:{level}",
                     "--measurement-interval", str(args.interval_ms), "--stability-percentage", stability,
                     "--max-trials", "6", "-f", f.name],
                    capture_output=True, text=True, timeout=180)
            except subprocess.TimeoutExpired:
                print(f"  c={level}: perf_analyzer timed out", flush=True)
                return failed
            if proc.returncode != 0:
                text = proc.stdout + proc.stderr
                if "stable measurement" in text and not unstable:
                    continue
                print(f"  c={level}: perf_analyzer failed: {text[-600:]}", flush=True)
                return failed
            rec = next(csv.DictReader(open(f.name)))
        row = {"concurrency": level, "throughput": float(rec["Inferences/Second"]),
               "p50_ms": float(rec["p50 latency"]) / 1000, "p99_ms": float(rec["p99 latency"]) / 1000,
               "unstable": unstable}
        print(f"  c={level:3d} {row['throughput']:8.0f}/s p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:6.2f} ms"
              + (" (unstable)" if unstable else ""), flush=True)
        return row
    return failed


def fmt(x: float, digits: int = 0) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def _peak(peer: str, rows: list[Row]) -> str:
    measured = [r for r in rows if r["throughput"] == r["throughput"]]  # NaN: not measured
    if not measured:
        return f"{peer} not measured (it did not start, or every run failed: see its log)"
    best = max(measured, key=lambda r: r["throughput"])
    return f"{peer} {fmt(best['throughput'])}/s (c={best['concurrency']}, p99 {fmt(best['p99_ms'], 1)} ms)"


def tables(results: dict[str, dict[str, list[Row]]], levels: list[int]) -> str:
    """Per mode: throughput by peer, then p50 / p99 by peer (two tables keep each readable)."""
    parts = []
    for mode, by_peer in results.items():
        peers = list(by_peer)
        rule = "|---:|" + "---:|" * len(peers)
        thr = [f"### {mode}: inferences/s", "", "| concurrency | " + " | ".join(peers) + " |", rule]
        lat = [f"### {mode}: p50 / p99 latency, ms", "", "| concurrency | " + " | ".join(peers) + " |", rule]
        for i, level in enumerate(levels):
            rows = [by_peer[p][i] for p in peers]
            thr.append(f"| {level} | " + " | ".join(fmt(r["throughput"]) + ("*" if r.get("unstable") else "")
                                                      for r in rows) + " |")
            lat.append(f"| {level} | " + " | ".join(f"{fmt(r['p50_ms'], 2)} / {fmt(r['p99_ms'], 2)}" for r in rows)
                       + " |")
        lines = [*thr, "", *lat, ""]
        if any(r.get("unstable") for rows in by_peer.values() for r in rows):
            lines += ["\\* perf_analyzer's windows never agreed within 25%: the figure is its last try.", ""]
        lines.append("Peak: " + "; ".join(_peak(p, by_peer[p]) for p in peers) + ".")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plots(results: dict[str, dict[str, list[Row]]], img: Path, tag: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    written = []
    what = tag.replace("-", ", ")
    for mode, by_peer in results.items():
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for peer, rows in by_peer.items():
            ok = [r for r in rows if r["throughput"] == r["throughput"]]
            a.plot([r["concurrency"] for r in ok], [r["throughput"] for r in ok], marker="o", label=peer)
            b.plot([r["throughput"] for r in ok], [r["p99_ms"] for r in ok], marker="o", label=peer)
        a.set(xscale="log", xlabel="concurrency (perf_analyzer, batch-1 requests)", ylabel="inferences/s",
              title=f"throughput vs concurrency ({mode}{what})")
        a.set_xticks(LEVELS, [str(x) for x in LEVELS])
        b.set(yscale="log", xlabel="inferences/s", ylabel="p99 latency (ms)", title=f"p99 vs throughput ({mode}{what})")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = img / f"peers{tag}-{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_doc(out: Path, section: str, tag: str = "") -> None:
    """Replace this script's block in ``out``; the first time, put it first among sweep.py's kept notes."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    begin, end = BEGIN.replace("compare.py", f"compare.py{tag}"), END.replace("compare.py", f"compare.py{tag}")
    block = f"{begin}\n{section}\n{end}"
    marker = "<!-- notes below are kept by benchmarks/sweep.py -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif marker in text:
        head, rest = text.split(marker, 1)
        text = head + marker + "\n\n" + block + "\n" + rest
    else:
        text = text + "\n" + marker + "\n\n" + block + "\n"
    out.write_text(text)


def commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return rev.strip() or "?"


def versions(peers: list[str], rev: str) -> list[str]:
    import ferry

    lines = []
    for p in peers:
        if p in FERRY:
            edge = " --edge" if p == "ferry-edge" else ""
            lines.append(f"- {p}: {ferry.__version__} (commit {rev}), `ferry up{edge}`")
        elif p == "plain":
            lines.append("- plain: `benchmarks/plain_server.py` (grpc.aio, onnxruntime in-process, no batching)")
        else:
            lines.append(f"- {p}: {importlib.import_module(f'benchmarks.peers.{p}').VERSION_NOTE}")
    return lines


def sequential(pa: str, args: argparse.Namespace, peers: list[str], modes: list[str], levels: list[int],
               onnx: Path, log_dir: Path, runs: dict[str, dict[str, list[list[Row]]]]) -> None:
    """Peer after peer, each with a sweep of its own, ``--repeat`` times in turn."""
    for rep in range(args.repeat):
        for mode in modes:
            server_cpu, client_cpu = cpus(mode)
            for p in peers:
                print(f"{p}, {mode} (run {rep + 1}/{args.repeat})", flush=True)
                try:
                    with serve(p, args, server_cpu, onnx, log_dir) as url:
                        runs[mode][p].append([measure(pa, url, c, args, client_cpu) for c in levels])
                except (RuntimeError, TimeoutError) as exc:
                    _did_not_start(p, exc, log_dir)
                    runs[mode][p].append(_missing(levels))


def _did_not_start(peer: str, exc: Exception, log_dir: Path) -> None:
    print(f"  {peer} did not start: {exc} (see {log_dir / (peer + '.log')})", flush=True)


def _missing(levels: list[int]) -> list[Row]:
    """A sweep of a peer that did not start: empty cells in the tables, gaps in the plots."""
    nan = float("nan")
    return [{"concurrency": c, "throughput": nan, "p50_ms": nan, "p99_ms": nan} for c in levels]


def interleaved(pa: str, args: argparse.Namespace, peers: list[str], modes: list[str], levels: list[int],
                onnx: Path, log_dir: Path, runs: dict[str, dict[str, list[list[Row]]]]) -> None:
    """``--interleave``: per mode, every peer up at once; per sweep and level, each peer in turn."""
    for mode in modes:
        server_cpu, client_cpu = cpus(mode)
        with contextlib.ExitStack() as stack:
            urls = {}
            for p in peers:
                # A second try: one failed start (a port race) would otherwise cost the peer the whole mode.
                for attempt in (1, 2):
                    print(f"starting {p}, {mode}" + (" (second try)" if attempt == 2 else ""), flush=True)
                    try:
                        urls[p] = stack.enter_context(serve(p, args, server_cpu, onnx, log_dir))
                        break
                    except (RuntimeError, TimeoutError) as exc:
                        _did_not_start(p, exc, log_dir)  # the others are still measured against each other
            up = [p for p in peers if p in urls]
            for rep in range(args.repeat):
                sweep: dict[str, list[Row]] = {p: [] for p in up}
                for level in levels:
                    for i in range(len(up)):
                        p = up[(i + rep) % len(up)]  # who goes first rotates with each sweep
                        print(f"{p}, {mode} (sweep {rep + 1}/{args.repeat})", flush=True)
                        sweep[p].append(measure(pa, urls[p], level, args, client_cpu))
                for p in peers:
                    runs[mode][p].append(sweep[p] if p in urls else _missing(levels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    ap.add_argument("--modes", default="pinned,unpinned", help="pinned (server CPU 0, client CPU 1), unpinned")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="perf_analyzer concurrency levels")
    ap.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer measurement window")
    ap.add_argument("--repeat", type=int, default=1, help="sweeps per peer and mode; tables show the median")
    ap.add_argument("--interleave", action="store_true",
                    help="start every peer of a mode at once and measure them in turn at each level (the "
                    "order rotating each sweep), so the machine's drift hits all alike; the idle peers cost "
                    "the measured one a little CPU")
    ap.add_argument("--max-batch", type=int, default=32, help="rows per model call, every server")
    ap.add_argument("--delay-us", type=int, default=2000, help="batching window, every server")
    ap.add_argument("--ferry-gateways", type=int, default=1)
    ap.add_argument("--ferry-workers", type=int, default=1)
    ap.add_argument("--start-timeout-s", type=float, default=180)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's rows here")
    ap.add_argument("--setup-only", action="store_true", help="install the peers and exit")
    ap.add_argument("--streaming", action="store_true",
                    help="perf_analyzer --streaming: ModelStreamInfer, one bidirectional stream per client "
                    "(its own section and plots)")
    ap.add_argument("--sched-batch-all", action="store_true",
                    help="run the other servers under SCHED_BATCH too (chrt --batch 0), the policy `ferry up` "
                    "gives its processes on fewer than 4 CPUs: does it help them as well?")
    ap.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="write the tables and plots of a run saved with --json, without measuring")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    if unknown := set(peers) - set(PEERS):
        ap.error(f"unknown peer(s) {sorted(unknown)}; choose from {', '.join(PEERS)}")
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - {"pinned", "unpinned"}:
        ap.error(f"unknown mode(s) {sorted(unknown)}; choose pinned and/or unpinned")
    if "pinned" in modes and ((os.cpu_count() or 1) < 2 or not shutil.which("taskset")):
        ap.error("pinned mode needs 2 CPUs and taskset (util-linux)")
    levels = [int(x) for x in args.levels.split(",")]
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        # Found out before the run, not after half an hour of measuring.
        ap.error("the plots need matplotlib: pip install -e '.[bench]', or pass --no-plots")

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        run = saved["args"] | {"commit": saved.get("commit", commit()), "date": saved.get("date", "")}
        report(args, saved["median"], [int(x) for x in saved["args"]["levels"].split(",")], run)
        return
    for p in peers:
        if p in EXTERNAL:
            started = time.monotonic()
            print(f"setting up {p} ...", flush=True)
            importlib.import_module(f"benchmarks.peers.{p}").setup(ROOT / ".cache" / "peers" / p)
            print(f"  ready in {time.monotonic() - started:.0f}s", flush=True)
    if args.setup_only:
        return
    pa = perf_analyzer()
    from ferry.example_model import build_onnx

    log_dir = Path(tempfile.mkdtemp(prefix="ferry-compare-"))
    onnx = log_dir / "mlp.onnx"
    onnx.write_bytes(build_onnx())
    print(f"server logs: {log_dir}", flush=True)
    runs: dict[str, dict[str, list[list[Row]]]] = {m: {p: [] for p in peers} for m in modes}
    (interleaved if args.interleave else sequential)(pa, args, peers, modes, levels, onnx, log_dir, runs)
    results = {m: {p: median_rows(runs[m][p]) for p in peers} for m in modes}
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "median": results, "date": time.strftime("%Y-%m-%d"), "commit": commit()},
                                        indent=1))
    report(args, results, levels, {k: str(v) for k, v in vars(args).items()} | {"commit": commit()})


def report(args: argparse.Namespace, results: dict[str, dict[str, list[Row]]], levels: list[int],
           run: dict[str, str]) -> None:
    """docs/benchmarks.md's section and the plots, from a run's settings (``run``) and its medians."""
    peers = list(next(iter(results.values())))
    streaming = run.get("streaming") == "True"
    tag = "-streaming" if streaming else ""
    images = [] if args.no_plots else plots(results, args.img, tag)
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    # The command that measures what this section shows (a run of a few peers is not the default's).
    again = " ".join([".venv/bin/python benchmarks/compare.py", f"--peers {','.join(peers)}",
                      f"--modes {','.join(results)}", f"--repeat {run['repeat']}",
                      *(["--interleave"] if run.get("interleave") == "True" else []),
                      *(["--streaming"] if streaming else []),
                      *(["--sched-batch-all"] if run.get("sched_batch_all") == "True" else [])])
    section = "\n".join([
        f"## Side by side: {', '.join(peers)}"
        + (" — ModelStreamInfer (perf_analyzer --streaming)" if streaming else ""),
        "",
        f"Regenerate with `{again}` (without `--peers` it measures every peer, Ray Serve and the plain "
        "server included; "
        "`--json F` keeps the run, "
        f"`--from-json F` redraws it). This run: {run.get('date') or time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores ({cpu}). Every server: the example MLP, "
        "onnxruntime on the CPU with one thread, one model instance, at most "
        f"{run['max_batch']} rows per model call, batching window {run['delay_us']} µs. perf_analyzer, batch-1 "
        f"gRPC requests, closed loop, {run['interval_ms']} ms windows; {run['repeat']} sweep(s) per peer and mode "
        + ("(every peer of a mode up at once, measured in turn at each level, the order rotating each sweep; "
           if run.get("interleave") == "True" else "(")
        + "the median run is shown). *pinned*: the server, every process of it, on CPU 0 and perf_analyzer on "
        "CPU 1; *unpinned*: both share both cores. "
        f"Ferry: {run['ferry_gateways']} gateway(s), {run['ferry_workers']} worker(s), one broker, Redis; *ferry* "
        "batches adaptively (its default), *ferry-edge* the same behind the native edge (`ferry up --edge`, "
        "docs/edge.md), *ferry-fixed* with Triton's rule (`FERRY_BATCH_WINDOW=fixed`: a "
        "partial batch leaves when its oldest request has waited the window). On fewer than 4 CPUs `ferry up` "
        "runs its processes under Linux's SCHED_BATCH policy (docs/edge.md)"
        + ("; in this run every other server ran under it too (`chrt --batch 0`)." if run.get("sched_batch_all")
           == "True" else "; the other servers run under the default policy."),
        "",
        *versions(peers, run.get("commit") or commit()),
        "",
        tables(results, levels),
        "",
        *[f"![{p.stem}](img/{p.name})" for p in images],
    ])
    write_doc(args.out, section, tag.replace("-", " --"))
    print(f"wrote {', '.join(str(p) for p in [args.out, *images])}")


if __name__ == "__main__":
    main()
