"""``ferry profile``: measure one model on each pool it may run on, and plan the cheapest pool mix.

For every pool in the model's ``ferry.pools`` whose runtime loads on this
machine, and every batch size of the sweep, the runtime is called back to
back on random inputs for ``--seconds``; each call's latency is recorded.
What this measures is ONE worker: one process, the runtime called in-process.
No RPC, no Redis, no broker queueing, no request decode or reply encode.
Costs are the config's per-worker-hour numbers, nothing more.

``workers.capacity.plan`` turns the measurements into the cheapest set of
workers (one pool, or a mix of two) that carries a target load with every
batch's p99 under a bound.  Importing this module touches neither Ferry's
protos nor a hardware library, so tests can call its pure parts in a process
that also holds tritonclient.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ferry import settings as cfg
from ferry.errors import ConfigError
from workers.capacity import (
    Measurement,
    Plan,
    PoolResult,
    default_batch_sizes,
    parse_pairs,
    parse_sizes,
    plan,
    summarize,
)

if TYPE_CHECKING:
    from ferry.model_config import TensorSpec
    from ferry.repository import ModelVersion
    from workers.runtime import Arrays, Runtime

WARMUP_CALLS = 5
MIN_CALLS = 3
INSTALL_PLOT = "pip install -e '.[bench]'"


# --------------------------------------------------------------------------- measuring --


def random_inputs(specs: Sequence[TensorSpec], rows: int, batched: bool, dims: dict[str, int],
                  buckets: dict[str, tuple[int, ...]], seed: int = 0) -> Arrays:
    """Random values for every input: ``rows`` rows of each when ``batched``, else one unbatched tensor."""
    from ferry.model_config import bucket_dims

    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for spec in specs:
        shape = tuple(dims.get(spec.name, 1) if d == -1 else d for d in spec.dims)
        if spec.name in buckets:
            # A worker pads variable dims to the bucket: that is the shape the model really runs.
            shape = bucket_dims(shape, spec.dims, buckets[spec.name])
        full = (rows, *shape) if batched else shape
        dt = spec.dtype
        if dt.is_bytes:
            arr = np.full(full, b"ferry", dtype=object)
        elif dt.name == "BOOL":
            arr = rng.integers(0, 2, full).astype(bool)
        elif dt.numpy.kind in "iu":
            # 0 and 1 are valid ids for any embedding table or one-hot index.
            arr = rng.integers(0, 2, full).astype(dt.numpy)
        else:
            arr = rng.standard_normal(full).astype(dt.numpy)
        out[spec.name] = arr
    return out


def _pad_rows(inputs: Arrays, target: int) -> Arrays:
    out: Arrays = {}
    for name, arr in inputs.items():
        rows = arr.shape[0]
        if target > rows:
            fill = np.full((target - rows, *arr.shape[1:]), b"" if arr.dtype == object else 0, dtype=arr.dtype)
            arr = np.concatenate([arr, fill])
        out[name] = arr
    return out


def measure(call: Callable[[], object], seconds: float, clock: Callable[[], int] = time.perf_counter_ns
            ) -> tuple[list[int], float]:
    """Warm up, then call back to back for ``seconds`` (at least MIN_CALLS calls); per-call ns and wall s."""
    t_end = clock() + int(seconds * 0.1e9)
    for i in range(10_000):
        if i >= WARMUP_CALLS and clock() >= t_end:
            break
        call()
    latencies: list[int] = []
    start = clock()
    deadline = start + int(seconds * 1e9)
    while True:
        t0 = clock()
        call()
        t1 = clock()
        latencies.append(t1 - t0)
        if t1 >= deadline and len(latencies) >= MIN_CALLS:
            return latencies, (t1 - start) / 1e9


def profile_pool(runtime: Runtime, mv: ModelVersion, pool: str, cost: float, sizes: Sequence[int],
                 seconds: float, dims: dict[str, int], progress: Callable[[str], None]) -> list[Measurement]:
    s = mv.settings
    batched = s.max_batch_size > 0
    static = tuple(sorted(s.static_batch_sizes))
    outputs = [t.name for t in s.outputs]
    rows: list[Measurement] = []
    for size in sizes:
        target = next((x for x in static if x >= size), size) if static else size
        inputs = random_inputs(s.inputs, size, batched, dims, dict(s.shape_buckets))
        if batched:
            inputs = _pad_rows(inputs, target)
        progress(f"{pool}: batch size {size}" + (f" (padded to {target})" if target != size else ""))
        try:
            latencies, elapsed = measure(functools.partial(runtime.run, inputs, outputs), seconds)
        except Exception as exc:  # e.g. out of device memory at a large size: report it, go on
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            rows.append(Measurement(size, target, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, error=message))
            continue
        rows.append(summarize(size, target, latencies, elapsed, cost))
    return rows


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}"


# --------------------------------------------------------------------------- reporting --


def _one_line(text: str, limit: int = 300) -> str:
    """Error text fit for a markdown line or cell (the JSON keeps it whole)."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _money(x: float) -> str:
    return f"{x:.4g}" if x < 1 else f"{x:,.2f}"


def render(model: str, version: int, pools: Sequence[PoolResult], seconds: float, threads: str,
           result: Plan | None) -> str:
    lines = [
        f"# ferry profile: {model} v{version}",
        "",
        f"One worker per pool, measured on this machine ({machine()}): one process calling the runtime "
        f"in-process, batch after batch on random inputs, for {seconds:g} s per batch size after a warm-up. "
        "No RPC, no Redis, no broker queueing, no request decode or reply encode. Latencies are of one "
        f"batch (p99: nearest rank). onnxruntime threads per worker: {threads}. Costs are the per-worker-hour "
        "figures of the model's ferry.pools.",
        "",
    ]
    for r in pools:
        if r.unavailable:
            lines.append(f"- pool `{r.pool}` ({r.runtime}, {_money(r.cost_per_hour)}/worker-hour): "
                         f"not available here: {_one_line(r.unavailable, 1000)}")
        else:
            lines.append(f"- pool `{r.pool}`: {r.runtime} on {', '.join(r.devices) or '?'}, "
                         f"{_money(r.cost_per_hour)}/worker-hour")
        lines += [f"  - note: {n}" for n in r.notes]
    lines += [
        "",
        "| pool | batch size | batches/s | inferences/s | p50 ms | p99 ms | cost / 1M inferences | calls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in pools:
        for m in r.rows:
            size = f"{m.batch_size}" + (f" (padded to {m.padded_to})" if m.padded_to != m.batch_size else "")
            if m.error:
                lines.append(f"| {r.pool} | {size} | failed: {_one_line(m.error)} | | | | | |")
            else:
                lines.append(f"| {r.pool} | {size} | {m.batches_per_s:,.1f} | {m.inferences_per_s:,.1f} | "
                             f"{m.p50_ms:.3f} | {m.p99_ms:.3f} | {_money(m.cost_per_million)} | {m.calls} |")
    if result is not None:
        lines += ["", *render_plan(result)]
    return "\n".join(lines) + "\n"


def render_plan(p: Plan) -> list[str]:
    bound = "no p99 bound" if math.isinf(p.p99_ms) else f"batch p99 <= {p.p99_ms:g} ms"
    lines = [f"## Cheapest plan for {p.target_rps:,.6g} inferences/s, {bound}", ""]
    if p.best is None:
        if p.closest is None:
            lines.append("No pool could be measured: no plan.")
        else:
            c = p.closest
            lines.append(f"No pool meets the bound. Closest: pool `{c.pool}` at batch size {c.batch_size}, "
                         f"p99 {c.p99_ms:.3f} ms.")
        return lines
    lines += [
        "| pool | workers | batch size | inferences/s per worker | batch p99 ms | cost/hour per worker |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in p.best.allocations:
        lines.append(f"| {a.pool} | {a.workers} | {a.batch_size} | {a.inferences_per_s:,.1f} | {a.p99_ms:.3f} | "
                     f"{_money(a.cost_per_hour)} |")
    b = p.best
    lines += [
        "",
        f"Total: {b.workers} worker(s), {_money(b.hourly_cost)}/hour, {_money(b.cost_per_million)} per million "
        f"inferences at {p.target_rps:,.6g}/s (capacity {b.capacity:,.1f}/s).",
    ]
    if len(p.single_pool) > 1 or (p.single_pool and p.single_pool[0] != b):
        lines.append("Each pool alone: " + "; ".join(
            f"`{o.allocations[0].pool}` {o.workers} worker(s) at batch size {o.allocations[0].batch_size}, "
            f"{_money(o.hourly_cost)}/hour" for o in p.single_pool) + ".")
    lines += [
        "",
        "The bound is on one batch's run time: queueing in the broker, the batching delay and the RPC "
        "come on top. The plan keeps every worker busy at its batch size (no headroom): raise "
        "--target-rps to leave some.",
    ]
    return lines


def write_plot(pools: Sequence[PoolResult], path: Path, title: str, p99_ms: float | None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"ferry profile: matplotlib is not installed ({INSTALL_PLOT}); no plot", file=sys.stderr)
        return False
    plt.rcParams["svg.hashsalt"] = "ferry-profile"  # stable ids: reruns diff only where numbers changed
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in pools:
        ok = [m for m in r.rows if not m.error]
        if not ok:
            continue
        xs = [m.batch_size for m in ok]
        left.plot(xs, [m.inferences_per_s for m in ok], marker="o", ms=3, label=r.pool)
        right.plot(xs, [m.p99_ms for m in ok], marker="o", ms=3, label=r.pool)
    if p99_ms is not None and not math.isinf(p99_ms):
        right.axhline(p99_ms, color="grey", ls="--", lw=0.8, label=f"p99 bound {p99_ms:g} ms")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    sizes = sorted({m.batch_size for r in pools for m in r.rows})
    right.set_yscale("log")  # pools differ by orders of magnitude in latency
    for ax, ylabel in ((left, "inferences/s (one worker)"), (right, "p99 of one batch (ms, log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    left.set_ylim(bottom=0)
    # Plain numbers; of the minor ticks only 2x and 5x, which stay readable over several decades.
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _pos: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------- main --


def _progress(text: str) -> None:
    print(f"ferry profile: {text}", file=sys.stderr, flush=True)


def main(ns: argparse.Namespace) -> int:
    """Run ``ferry profile`` from parsed arguments (see cli.py for the flags)."""
    from ferry.repository import load_repository
    from workers.runtime import load_runtime

    _check_plan_args(ns)
    # Whichever WorkerSettings knobs cli.py gave flags to (None = not given: environment, then default).
    knobs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cfg.WorkerSettings)
             if hasattr(ns, f.name) and f.name not in ("pool", "runtime")}
    base = cfg.build(cfg.WorkerSettings, {**knobs, "pool": "cpu", "runtime": "onnx-cpu"})
    repo = load_repository(base.model_repository)
    model = ns.model
    if model is None:
        if len(repo.names) != 1:
            raise ConfigError(f"--model: the repository holds {', '.join(repo.names)}; name one")
        model = repo.names[0]
    mv = repo.get(model, ns.version)
    pools = _pool_runtimes(ns, mv)
    sizes, dims, model_notes = _sweep(ns, mv)

    results: list[PoolResult] = []
    for pool, cost, runtime_name, pool_notes in pools:
        notes = (*model_notes, *pool_notes)
        settings = cfg.build(cfg.WorkerSettings, {**knobs, "pool": pool, "runtime": runtime_name})
        _progress(f"{pool}: loading {runtime_name}")
        try:
            runtime = load_runtime(settings, mv)
        except ConfigError as exc:
            results.append(PoolResult(pool, cost, runtime_name, unavailable=exc.message, notes=notes))
            continue
        rows = profile_pool(runtime, mv, pool, cost, sizes, ns.seconds, dims, _progress)
        results.append(PoolResult(pool, cost, runtime_name, tuple(runtime.devices), "", notes, tuple(rows)))
        del runtime  # free device memory before the next pool loads

    bound = ns.p99_ms if ns.p99_ms is not None else math.inf
    the_plan = plan(results, ns.target_rps, bound) if ns.target_rps is not None else None
    threads = f"intra-op {base.intra_op_threads}, inter-op {base.inter_op_threads}"
    sys.stdout.write(render(mv.name, mv.version, results, ns.seconds, threads, the_plan))
    sys.stdout.flush()
    if ns.json:
        doc: dict[str, Any] = {
            "model": mv.name, "version": mv.version, "machine": machine(), "seconds": ns.seconds,
            "threads": {"intra_op": base.intra_op_threads, "inter_op": base.inter_op_threads},
            "measures": "one worker: one process, runtime called in-process; no RPC, queueing, decode or encode",
            "batch_sizes": list(sizes), "pools": [dataclasses.asdict(r) for r in results],
            "plan": _plan_json(the_plan),
        }
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(doc, indent=2) + "\n")
        _progress(f"wrote {ns.json}")
    if ns.plot and write_plot(results, ns.plot, f"ferry profile: {mv.name} v{mv.version}, one worker, "
                              f"{machine()}", None if the_plan is None else the_plan.p99_ms):
        _progress(f"wrote {ns.plot}")
    return 0


def _check_plan_args(ns: argparse.Namespace) -> None:
    if not ns.seconds > 0:
        raise ConfigError("--seconds must be > 0")
    if ns.p99_ms is not None and ns.target_rps is None:
        raise ConfigError("--p99-ms needs --target-rps (the load the plan must carry)")
    if ns.target_rps is not None and not ns.target_rps > 0:
        raise ConfigError("--target-rps must be > 0")
    if ns.p99_ms is not None and not ns.p99_ms > 0:
        raise ConfigError("--p99-ms must be > 0")


def _pool_runtimes(ns: argparse.Namespace, mv: ModelVersion) -> list[tuple[str, float, str, tuple[str, ...]]]:
    """(pool, cost per worker-hour, runtime, notes) of each pool to profile, cheapest first."""
    costs = {p.name: p.cost for p in mv.settings.pools}
    wanted = [p.strip() for p in ns.pools.split(",") if p.strip()] if ns.pools else list(costs)
    unknown = [p for p in wanted if p not in costs]
    if unknown:
        raise ConfigError(f"--pools: {', '.join(unknown)} not in the ferry.pools of model {mv.name!r} "
                          f"({', '.join(costs)})")
    runtimes = parse_pairs(ns.pool_runtime, "--pool-runtime")
    for pool, rt in runtimes.items():
        if pool not in costs:
            raise ConfigError(f"--pool-runtime: {pool!r} is not in the ferry.pools of model {mv.name!r} "
                              f"({', '.join(costs)})")
        if rt not in cfg.RUNTIMES:
            raise ConfigError(f"--pool-runtime {pool}={rt}: runtime must be one of {', '.join(cfg.RUNTIMES)}")
    out: list[tuple[str, float, str, tuple[str, ...]]] = []
    for pool in (p for p in costs if p in wanted):
        runtime = runtimes.get(pool) or cfg.DEFAULT_RUNTIMES.get(pool)
        if runtime is None:
            # A worker of a custom pool must name its runtime; here the likeliest one is assumed, visibly.
            out.append((pool, costs[pool], "onnx-cpu",
                        (f"custom pool: no --pool-runtime {pool}=RUNTIME given, profiled with onnx-cpu",)))
        else:
            out.append((pool, costs[pool], runtime, ()))
    return out


def _sweep(ns: argparse.Namespace, mv: ModelVersion) -> tuple[tuple[int, ...], dict[str, int], tuple[str, ...]]:
    """Batch sizes, sizes of variable dims, and notes on what was assumed about the inputs."""
    s = mv.settings
    sizes = parse_sizes(ns.batch_sizes) if ns.batch_sizes else default_batch_sizes(
        s.max_batch_size, s.static_batch_sizes)
    if s.max_batch_size <= 0 and sizes != (1,):
        raise ConfigError(f"model {mv.name!r} has max_batch_size 0 (no batching): only batch size 1")
    if s.max_batch_size > 0 and sizes[-1] > s.max_batch_size:
        raise ConfigError(f"--batch-sizes: {sizes[-1]} is larger than max_batch_size ({s.max_batch_size})")
    dims = {k: _positive(v, f"--dim {k}") for k, v in parse_pairs(ns.dim, "--dim").items()}
    variable = [t.name for t in s.inputs if -1 in t.dims]
    for name in dims:
        if name not in variable:
            raise ConfigError(f"--dim {name}: not an input with variable dims (those: {', '.join(variable) or 'none'})")
    notes = [f"input {n!r} has variable dims: profiled at size 1 (set --dim {n}=SIZE)"
             for n in variable if n not in dims]
    if s.static_batch_sizes and any(x not in s.static_batch_sizes for x in sizes):
        notes.append(f"ferry.batch_sizes is {','.join(map(str, s.static_batch_sizes))}: other sizes are "
                     "padded to the next one, as a worker does, and count only their real rows")
    return sizes, dims, tuple(notes)


def _plan_json(p: Plan | None) -> dict[str, Any] | None:
    if p is None:
        return None
    doc = dataclasses.asdict(p)
    if math.isinf(p.p99_ms):
        doc["p99_ms"] = None  # JSON has no infinity
    return doc


def _positive(text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{what}: {text!r} is not a positive integer")
    return int(text)
