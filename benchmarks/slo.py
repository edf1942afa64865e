"""Latency against throughput under an SLO, per broker batching mode (open-loop perf_analyzer).

    .venv/bin/python benchmarks/slo.py                      # adaptive and fixed, writes docs/benchmarks.md
    .venv/bin/python benchmarks/slo.py --modes baseline --quick --out /tmp/b.md --plot /tmp/slo.svg

For each mode in MODES a local cluster is started with ``ferry up`` (example MLP,
``--workers 1`` by default) and the mode's FERRY_* variables in its environment.
perf_analyzer then offers batch-1 gRPC requests in OPEN loop (``--async``,
``--request-rate-range r:r``, Poisson arrivals by default) at each rate of the
sweep, one perf_analyzer run per rate so that one overloaded rate cannot abort
the sweep.  All clusters stay up and the modes are measured in turn (and
``--repeat`` times; figures are medians), so slow phases of a shared machine hit
every mode alike.

Per mode it reports the highest offered rate whose achieved throughput is within
5% of the offered rate with p99 <= 10 ms, and the same with p99 <= 50 ms, the
per-rate rows (offered, achieved, p50, p99) as markdown between
``<!-- slo:begin -->`` and ``<!-- slo:end -->`` in docs/benchmarks.md, and a
plot (p99 against achieved throughput) in docs/img/slo.svg.

perf_analyzer comes from ``benchmarks/install_perf_analyzer.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ferry.cluster import free_port  # noqa: E402
from ferry.example_model import EXAMPLE_MODEL  # noqa: E402

# The environment each broker batching mode is started with ("{fixed_delay_us}" is
# replaced by --fixed-delay-us).  FERRY_BATCH_WINDOW is new: a checkout that does not
# know it refuses to start (unknown FERRY_* variable), which this script reports up
# front; "baseline" sets nothing and runs against any checkout.
MODES: dict[str, dict[str, str]] = {
    "adaptive": {"FERRY_BATCH_WINDOW": "adaptive"},
    "fixed": {"FERRY_BATCH_WINDOW": "fixed", "FERRY_MAX_QUEUE_DELAY_US": "{fixed_delay_us}"},
    "baseline": {},
    # The broker's own gather window and pool depth, which `ferry up --edge` replaces (gather_us 0,
    # pool_depth 1: ferry.cluster.edge_batching): run with --edge against "baseline".
    "window": {"FERRY_GATHER_US": "2000", "FERRY_POOL_DEPTH": "2"},
    # Each half of that change alone.
    "g0d2": {"FERRY_GATHER_US": "0", "FERRY_POOL_DEPTH": "2"},
    "g2000d1": {"FERRY_GATHER_US": "2000", "FERRY_POOL_DEPTH": "1"},
}
DEFAULT_MODES = "adaptive,fixed"
SLOS_MS = (10.0, 50.0)
RATE_TOLERANCE = 0.05  # achieved must be >= (1 - this) * offered
DEFAULT_RATES = "250:6000:250"
QUICK_RATES = "500,1500,3000,4500"


# ----------------------------------------------------------------- shared helpers --
# (benchmarks/overload.py imports these.)


def install_sigterm_handler() -> None:
    """SIGTERM ends the script like Ctrl-C does, so ``finally`` blocks stop the clusters."""

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def mode_env(mode: str, fixed_delay_us: int) -> dict[str, str]:
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return {k: v.format(fixed_delay_us=fixed_delay_us) for k, v in MODES[mode].items()}


def check_modes_supported(envs: dict[str, dict[str, str]]) -> None:
    """Fail before starting anything if this checkout's Ferry does not know a mode's variables."""
    from ferry.settings import known_env_names

    known = known_env_names()
    missing = {m: sorted(k for k in env if k not in known) for m, env in envs.items()}
    missing = {m: v for m, v in missing.items() if v}
    if missing:
        what = "; ".join(f"{m}: {', '.join(v)}" for m, v in missing.items())
        raise SystemExit(f"this checkout's Ferry does not know these settings yet ({what}); "
                         f"run another mode (e.g. --modes baseline) until they land")


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    mem = ""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.1f} GiB RAM"
    return (f"{os.cpu_count()} cores ({model}){mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def perf_analyzer() -> str:
    out = subprocess.run([str(ROOT / "benchmarks" / "install_perf_analyzer.sh")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def server_ready(address: str, timeout_s: float) -> bool:
    """ServerReady over raw gRPC until it says ready or ``timeout_s`` passes.

    No generated stubs: Ferry's protos and tritonclient's register the same ``inference.*``
    protobuf names, so one process cannot import both (benchmarks/overload.py needs tritonclient).
    """
    import grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerReady",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if call(b"", timeout=1) == b"\x08\x01":  # ServerReadyResponse{ready: true}
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


@contextlib.contextmanager
def ferry_cluster(env_extra: dict[str, str], workers: int, log_path: Path,
                  ready_timeout_s: float = 90.0, hidden: int = 1024, edge: bool = False) -> Iterator[str]:
    """``ferry up`` with the example model and ``env_extra``; yields the gateway address.

    Stops it with SIGTERM (gateway, broker, workers and Redis stop in turn) and waits,
    also when the body raises; the log of ``ferry up`` and its children goes to ``log_path``.
    """
    port = free_port()
    repo = Path(tempfile.mkdtemp(prefix="ferry-slo-models-"))
    # The same console script as .venv/bin/ferry, but the ferry package of this checkout.
    ferry = [sys.executable, "-m", "ferry.cli"]
    subprocess.run([*ferry, "example-model", str(repo), "--hidden", str(hidden)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"} | env_extra
    address = f"127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        # Own session: a Ctrl-C on the terminal reaches only this script, which then stops
        # the cluster in order with SIGTERM.
        up = subprocess.Popen([*ferry, "up", "--grpc-port", str(port), "--workers", str(workers),
                               "--model-repository", str(repo), *(["--edge"] if edge else [])],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + ready_timeout_s
            ready = False
            while not ready and up.poll() is None and time.monotonic() < deadline:
                ready = server_ready(address, 1.0)
            # The gateway can be ready while a component that refused its settings (the broker, for a
            # bad FERRY_BATCH_WINDOW) has just exited; `ferry up` then stops within a fraction of a second.
            time.sleep(1.5)
            if not ready or up.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                what = " ".join(f"{k}={v}" for k, v in env_extra.items()) or "no extra env"
                raise RuntimeError(f"ferry up ({what}) did not start (exit code {up.poll()}); "
                                   f"log {log_path}:\n{tail}")
            yield address
        finally:
            if up.poll() is None:
                up.send_signal(signal.SIGTERM)
                try:
                    up.wait(120)
                except subprocess.TimeoutExpired:
                    print(f"ferry up (pid {up.pid}) did not stop in 120 s; killing it", file=sys.stderr)
                    up.kill()
                    up.wait()
            shutil.rmtree(repo, ignore_errors=True)


def replace_block(path: Path, name: str, block: str) -> None:
    """Put ``block`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``.

    Missing markers are appended at the end of the file (below sweep.py's notes marker,
    so a sweep.py run keeps the block); the rest of the file is left as it is.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    new = f"{begin}\n{block.strip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + new + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_list(spec: str) -> list[float]:
    """``a,b,c`` or ``start:end:step`` (end included)."""
    if ":" in spec:
        start, end, step = (float(x) for x in spec.split(":"))
        return [start + i * step for i in range(math.floor((end - start) / step + 1e-9) + 1)]
    return [float(x) for x in spec.split(",") if x.strip()]


# ------------------------------------------------------------------- measurement --


@dataclass
class Point:
    offered: float
    achieved: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    batch: float = math.nan  # mean batch size over the run, from the model's statistics
    error: str = ""
    note: str = ""

    @property
    def keeps_up(self) -> bool:
        return not self.error and self.achieved >= (1 - RATE_TOLERANCE) * self.offered

    def meets(self, slo_ms: float) -> bool:
        return self.keeps_up and self.p99_ms <= slo_ms


def batch_counts(url: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the example model: their ratio is the mean batch size."""
    import tritonclient.grpc as tc

    try:
        stats = tc.InferenceServerClient(url).get_inference_statistics(EXAMPLE_MODEL, as_json=True)
        s = stats["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))
    except Exception:
        return 0, 0


def run_rate(pa: str, url: str, rate: float, args: argparse.Namespace, interval_ms: int) -> Point:
    inferences, executions = batch_counts(url)
    point = _run_rate(pa, url, rate, args, interval_ms)
    # Workers write statistics to Redis every 0.1 s: wait that out before reading them.
    time.sleep(0.3)
    after_i, after_e = batch_counts(url)
    if after_e > executions:
        point.batch = (after_i - inferences) / (after_e - executions)
    return point


def _run_rate(pa: str, url: str, rate: float, args: argparse.Namespace, interval_ms: int) -> Point:
    with tempfile.TemporaryDirectory(prefix="ferry-slo-pa-") as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [pa, "-m", EXAMPLE_MODEL, "-u", url, "-i", "grpc", "-b", "1", "--async", "--shared-memory", "none",
               "--request-rate-range", f"{rate:g}:{rate:g}:1", "--request-distribution", args.distribution,
               "--max-threads", str(args.pa_threads), "--measurement-interval", str(interval_ms),
               "--percentile=99",
               # Open loop past capacity never settles; take max-trials windows and report them.
               "--stability-percentage", "1000", "--max-trials", str(args.max_trials), "-f", str(out)]
        budget = interval_ms / 1000 * (args.max_trials + 2) + 120
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=tmp)
        except subprocess.TimeoutExpired:
            return Point(rate, error=f"perf_analyzer timed out after {budget:.0f} s")
        rows = list(csv.DictReader(out.open())) if out.exists() else []
        if proc.returncode != 0 or not rows:
            lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            errs = [ln for ln in lines if re.search(r"error|fail|abort|unable", ln, re.I)]
            why = (errs or lines or [f"exit {proc.returncode}"])[-1]
            return Point(rate, error=f"perf_analyzer: {why[:120]}")
        rec = rows[0]
        return Point(rate, achieved=float(rec["Inferences/Second"]), p50_ms=float(rec["p50 latency"]) / 1000,
                     p99_ms=float(rec["p99 latency"]) / 1000)


def sweep(pa: str, url: str, rates: list[float], args: argparse.Namespace, label: str) -> list[Point]:
    points: list[Point] = []
    behind = 0
    for rate in rates:
        if behind >= args.stop_after:
            points.append(Point(rate, error="not run (past saturation)"))
            continue
        p = run_rate(pa, url, rate, args, args.interval_ms)
        points.append(p)
        state = "" if p.keeps_up else "  <- below offered" if not p.error else f"  <- {p.error}"
        print(f"  {label:>10} offered {rate:7.0f}/s achieved {p.achieved:7.0f}/s p50 {p.p50_ms:7.2f} ms "
              f"p99 {p.p99_ms:8.2f} ms batch {p.batch:5.2f}{state}", flush=True)
        behind = 0 if p.keeps_up else behind + 1
        time.sleep(args.pause_s)  # let a backlog drain before the next rate
    return points


def median_points(runs: list[list[Point]]) -> list[Point]:
    """Per offered rate, the median of each figure over the runs that measured it."""
    out = []
    for same in zip(*runs, strict=True):
        ok = [p for p in same if not p.error]
        if not ok:
            out.append(Point(same[0].offered, error=same[0].error))
            continue
        failed = len(same) - len(ok)
        note = f"{failed} of {len(same)} runs failed" if failed else ""
        # Failed runs are judged on the others, unless they are the majority.
        out.append(Point(same[0].offered, achieved=statistics.median(p.achieved for p in ok),
                         p50_ms=statistics.median(p.p50_ms for p in ok),
                         p99_ms=statistics.median(p.p99_ms for p in ok),
                         batch=statistics.median(p.batch for p in ok),
                         error=note if failed * 2 > len(same) else "", note=note))
    return out


def max_rate(points: list[Point], slo_ms: float) -> float | None:
    ok = [p.offered for p in points if p.meets(slo_ms)]
    return max(ok) if ok else None


# ------------------------------------------------------------------------ output --


def fmt(x: float, spec: str) -> str:
    return "—" if x != x else format(x, spec)


def markdown(results: dict[str, list[Point]], args: argparse.Namespace, envs: dict[str, dict[str, str]],
             plot_rel: str | None, started: str) -> str:
    env_txt = "; ".join(f"**{m}**: " + (" ".join(f"`{k}={v}`" for k, v in e.items()) or "no extra settings")
                        for m, e in envs.items())
    lines = [
        f"Generated by `benchmarks/slo.py {' '.join(args.argv)}`".rstrip() + f" on {started}.",
        f"Machine: {machine()}. The client (perf_analyzer, open loop: `--async --request-rate-range r:r`, "
        f"{args.distribution} arrivals, batch 1, gRPC, `--max-threads {args.pa_threads}`) shares those cores "
        f"with the servers.",
        f"Cluster: `ferry up --workers {args.workers}{' --edge' if args.edge else ''}` with the example model "
        f"`{EXAMPLE_MODEL}`; modes: {env_txt}.",
        f"Each rate: {args.max_trials} windows of {args.interval_ms} ms; {args.repeat} sweep(s) per mode, "
        f"modes in turn, figures are medians. A rate counts when achieved ≥ {100 - RATE_TOLERANCE * 100:.0f}% "
        f"of offered and p99 is within the SLO; after {args.stop_after} rates in a row below offered a mode's "
        f"sweep stops.",
        "",
        "| mode | max rate, p99 ≤ 10 ms | max rate, p99 ≤ 50 ms |",
        "|---|---:|---:|",
    ]
    for mode, pts in results.items():
        cells = [f"{r:.0f}/s" if (r := max_rate(pts, slo)) is not None else "none" for slo in SLOS_MS]
        lines.append(f"| {mode} | {' | '.join(cells)} |")
    if plot_rel:
        lines += ["", f"![p99 latency against achieved throughput]({plot_rel})"]
    for mode, pts in results.items():
        lines += ["", f"**{mode}**", "", "| offered /s | achieved /s | p50 ms | p99 ms | mean batch | note |",
                  "|---:|---:|---:|---:|---:|---|"]
        for p in pts:
            if p.error.startswith("not run"):
                continue
            note = p.error or ("" if p.keeps_up else "below offered")
            if not note:
                note = "p99 ≤ 10 ms" if p.meets(10) else "p99 ≤ 50 ms" if p.meets(50) else "p99 over 50 ms"
            if p.note and p.note not in note:
                note += f"; {p.note}"
            lines.append(f"| {p.offered:.0f} | {fmt(p.achieved, '.0f')} | {fmt(p.p50_ms, '.2f')} "
                         f"| {fmt(p.p99_ms, '.2f')} | {fmt(p.batch, '.1f')} | {note} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[Point]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (.venv/bin/pip install matplotlib); no plot", file=sys.stderr)
        return False
    plt.rcParams["svg.hashsalt"] = "ferry-slo"  # stable ids: a rerun diffs only where numbers changed
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for mode, pts in results.items():
        ok = [p for p in pts if not p.error]
        ax.plot([p.achieved for p in ok], [p.p99_ms for p in ok], marker="o", ms=3, label=mode)
    for slo in SLOS_MS:
        ax.axhline(slo, color="grey", ls="--", lw=0.8)
        ax.annotate(f"{slo:g} ms", (0, slo), xycoords=("axes fraction", "data"), xytext=(3, 2),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (inferences/s)")
    ax.set_ylabel("p99 latency (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {', '.join(MODES)} "
                    f"(default {DEFAULT_MODES})")
    ap.add_argument("--fixed-delay-us", type=int, default=2000, help="batching window of the fixed mode (µs)")
    ap.add_argument("--rates", default=None,
                    help=f"offered rates /s: a,b,c or start:end:step (default {DEFAULT_RATES}; --quick: {QUICK_RATES})")
    ap.add_argument("--interval-ms", type=int, default=None, help="perf_analyzer window (default 3000; --quick 1000)")
    ap.add_argument("--max-trials", type=int, default=None, help="windows per rate, at least 3 (default 3)")
    ap.add_argument("--repeat", type=int, default=1, help="sweeps per mode; figures are medians (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few rates, short windows")
    ap.add_argument("--distribution", choices=("poisson", "constant"), default="poisson",
                    help="perf_analyzer's inter-arrival distribution (default poisson)")
    ap.add_argument("--pa-threads", type=int, default=2, help="perf_analyzer --max-threads (default 2)")
    ap.add_argument("--set", action="append", default=[], metavar="FERRY_KNOB=VALUE",
                    help="an extra setting for every mode's cluster (repeatable), e.g. FERRY_POOL_DEPTH=1")
    ap.add_argument("--workers", type=int, default=1, help="Ferry CPU workers (default 1)")
    ap.add_argument("--edge", action="store_true", help="every cluster behind the native edge (ferry up --edge)")
    ap.add_argument("--stop-after", type=int, default=3,
                    help="stop a mode's sweep after this many rates in a row below offered (default 3)")
    ap.add_argument("--pause-s", type=float, default=1.0, help="pause between rates (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md",
                    help="markdown file to put the results in, between <!-- slo:begin/end --> markers")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "slo.svg", help="SVG plot to write")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results (every run) here")
    ap.add_argument("--no-write", action="store_true", help="print the markdown, write nothing")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    args.interval_ms = args.interval_ms or (1000 if args.quick else 3000)
    args.max_trials = args.max_trials or 3  # perf_analyzer needs 3 windows to call a rate stable
    rates = parse_list(args.rates or (QUICK_RATES if args.quick else DEFAULT_RATES))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    extra = dict(kv.split("=", 1) for kv in args.set)
    envs = {m: mode_env(m, args.fixed_delay_us) | extra for m in modes}
    check_modes_supported(envs)
    install_sigterm_handler()
    pa = perf_analyzer()
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    logs = Path(tempfile.mkdtemp(prefix="ferry-slo-logs-"))
    print(f"machine: {machine()}\nrates: {', '.join(f'{r:g}' for r in rates)}\ncluster logs: {logs}", flush=True)
    runs: dict[str, list[list[Point]]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        urls = {}
        for m in modes:
            urls[m] = stack.enter_context(ferry_cluster(envs[m], args.workers, logs / f"{m}.log",
                                                            edge=args.edge))
            print(f"{m}: ferry up on {urls[m]} with {envs[m] or 'no extra env'}", flush=True)
            run_rate(pa, urls[m], rates[0], args, 1000)  # warm-up, discarded
        for rep in range(args.repeat):
            for m in modes:
                print(f"{m} (run {rep + 1} of {args.repeat})", flush=True)
                runs[m].append(sweep(pa, urls[m], rates, args, m))
    results = {m: median_points(r) for m, r in runs.items()}
    title = f"Ferry, example MLP, open-loop {args.distribution} — {machine().split(', Linux')[0]}"
    plot_rel = None
    if not args.no_write and plot(results, args.plot, title):
        plot_rel = os.path.relpath(args.plot, args.out.parent)
        print(f"wrote {args.plot}")
    md = markdown(results, args, envs, plot_rel, started)
    print("\n" + md)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "started": started, "argv": args.argv,
                                         "envs": envs, "runs": {m: [[asdict(p) for p in run] for run in r]
                                                                for m, r in runs.items()}}, indent=1))
        print(f"wrote {args.json}")
    if not args.no_write:
        replace_block(args.out, "slo", md)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
