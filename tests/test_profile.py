"""``ferry profile``: measuring the example MLP for real, and the pure planning logic.

Profiling runs in a subprocess (``python -m ferry.cli profile``): it loads the
repository, which imports Ferry's protos, and those cannot share the pytest
process with tritonclient (see conftest).  ``workers.profile`` itself imports
neither protos nor a hardware library (checked below), so ``plan`` and
``summarize`` are tested in-process.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import fragile_model
from workers.capacity import (
    Measurement,
    Option,
    PoolResult,
    default_batch_sizes,
    percentile,
    plan,
    summarize,
)
from workers.profile import measure

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}


def _ferry(*args: str, python: tuple[str, ...] = ("-m", "ferry.cli")) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python, *args], capture_output=True, text=True, timeout=60,
                          env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("example")
    proc = _ferry("example-model", str(root))
    assert proc.returncode == 0, proc.stderr
    return root


def _variant(example: Path, dest: Path, *, parameters: dict[str, str], max_batch: int = 32) -> Path:
    shutil.copytree(example, dest)
    config = dest / "mlp" / "config.pbtxt"
    text = config.read_text().replace("max_batch_size: 32", f"max_batch_size: {max_batch}")
    text += "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())
    config.write_text(text)
    return dest


def _rows(stdout: str, pool: str) -> dict[str, list[str]]:
    """Measurement-table rows of one pool, by their batch-size cell."""
    rows = {}
    for line in stdout.split("## Cheapest plan")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == pool:
            rows[cells[1]] = cells
    return rows


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


# ------------------------------------------------------------------------ real runs --


def test_profiles_the_example_mlp_on_cpu(example: Path, tmp_path: Path) -> None:
    out_json, out_svg = tmp_path / "profile.json", tmp_path / "profile.svg"
    proc = _ferry("profile", "--model-repository", str(example), "--model", "mlp", "--batch-sizes", "1,4",
                  "--seconds", "0.3", "--target-rps", "1000", "--p99-ms", "1000",
                  "--json", str(out_json), "--plot", str(out_svg))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "One worker per pool" in out and "in-process" in out and "No RPC" in out
    rows = _rows(out, "cpu")
    assert set(rows) == {"1", "4"}, out
    for size, cells in rows.items():
        batches, inferences = _number(cells[2]), _number(cells[3])
        p50, p99, calls = _number(cells[4]), _number(cells[5]), int(cells[7])
        assert batches > 0 and inferences == pytest.approx(batches * int(size), rel=0.01)
        assert 0 < p50 <= p99 and calls >= 3
        assert _number(cells[6]) == pytest.approx(1.0 / (inferences * 3600) * 1e6, rel=0.01)  # cpu costs 1.0
    assert "## Cheapest plan for 1,000 inferences/s, batch p99 <= 1000 ms" in out
    assert "queueing" in out  # the bound is on batch latency alone, and the output says so

    doc = json.loads(out_json.read_text())
    assert {"model", "version", "machine", "seconds", "measures", "batch_sizes", "pools", "plan"} <= set(doc)
    assert doc["model"] == "mlp" and doc["version"] == 1 and doc["batch_sizes"] == [1, 4]
    (pool,) = doc["pools"]
    assert pool["pool"] == "cpu" and pool["runtime"] == "onnx-cpu" and pool["devices"] == ["cpu"]
    assert pool["unavailable"] == "" and pool["cost_per_hour"] == 1.0
    assert [r["batch_size"] for r in pool["rows"]] == [1, 4]
    for r in pool["rows"]:
        assert {"batches_per_s", "inferences_per_s", "p50_ms", "p99_ms", "cost_per_million", "calls"} <= set(r)
        assert r["inferences_per_s"] > 0 and r["error"] == ""
    best = doc["plan"]["best"]
    assert best["workers"] >= 1 and best["allocations"][0]["pool"] == "cpu"
    assert best["capacity"] >= 1000
    if importlib.util.find_spec("matplotlib") is not None:  # optional: the bench extra
        assert out_svg.read_text().lstrip().startswith("<?xml")
    else:
        assert not out_svg.exists() and "pip install -e '.[bench]'" in proc.stderr


def test_gpu_pool_is_reported_unavailable_on_a_cpu_machine(example: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA: the gpu pool would really be measured")
    repo = _variant(example, tmp_path / "repo", parameters={"ferry.pools": "gpu=3.0, cpu=1.0"})
    proc = _ferry("profile", "--model-repository", str(repo), "--batch-sizes", "1,4", "--seconds", "0.3",
                  "--json", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    gpu_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("- pool `gpu`"))
    assert "- pool `gpu` (onnx-gpu, 3.00/worker-hour): not available here: " in gpu_line
    assert "without CUDA" in gpu_line  # onnx-gpu's own reason, passed on
    assert not _rows(proc.stdout, "gpu")  # nothing measured, nothing faked
    assert set(_rows(proc.stdout, "cpu")) == {"1", "4"}
    pools = {p["pool"]: p for p in json.loads((tmp_path / "p.json").read_text())["pools"]}
    assert pools["gpu"]["unavailable"] and pools["gpu"]["rows"] == [] and pools["gpu"]["cost_per_hour"] == 3.0
    assert pools["cpu"]["unavailable"] == "" and len(pools["cpu"]["rows"]) == 2


def test_custom_pool_static_sizes_and_no_matplotlib(example: Path, tmp_path: Path) -> None:
    repo = _variant(example, tmp_path / "repo", max_batch=8,
                    parameters={"ferry.pools": "spot=0.25, cpu=1.0", "ferry.batch_sizes": "4,8"})
    script = "import sys; sys.modules['matplotlib'] = None; from ferry.cli import main; sys.exit(main())"
    proc = _ferry("profile", "--model-repository", str(repo), "--pools", "spot", "--batch-sizes", "3,8",
                  "--seconds", "0.1", "--plot", str(tmp_path / "p.svg"), python=("-c", script))
    assert proc.returncode == 0, proc.stderr
    assert "custom pool: no --pool-runtime spot=RUNTIME given, profiled with onnx-cpu" in proc.stdout
    assert "0.25/worker-hour" in proc.stdout
    assert set(_rows(proc.stdout, "spot")) == {"3 (padded to 4)", "8"}
    assert not _rows(proc.stdout, "cpu")  # --pools left it out
    assert "pip install -e '.[bench]'" in proc.stderr and not (tmp_path / "p.svg").exists()


def test_a_failing_batch_is_reported_not_measured(tmp_path: Path) -> None:
    fragile_model(tmp_path / "repo")  # Reshape to [batch, 3, n/3]: fails with n = 1, the default for a variable dim
    proc = _ferry("profile", "--model-repository", str(tmp_path / "repo"), "--batch-sizes", "2",
                  "--seconds", "0.1", "--target-rps", "10", "--json", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    assert "input 'x' has variable dims: profiled at size 1 (set --dim x=SIZE)" in proc.stdout
    (cells,) = _rows(proc.stdout, "cpu").values()
    assert cells[2].startswith("failed: ") and "Reshape" in cells[2]
    assert "No pool could be measured: no plan." in proc.stdout
    (row,) = json.loads((tmp_path / "p.json").read_text())["pools"][0]["rows"]
    assert "Reshape" in row["error"] and row["calls"] == 0


@pytest.mark.parametrize(("args", "needle"), [
    (("--pools", "tpu"), "--pools: tpu not in the ferry.pools of model 'mlp' (cpu)"),
    (("--pool-runtime", "cpu=tensorflow"), "runtime must be one of onnx-cpu, onnx-gpu, neuron"),
    (("--batch-sizes", "1,64"), "64 is larger than max_batch_size (32)"),
    (("--p99-ms", "5"), "--p99-ms needs --target-rps"),
    (("--dim", "INPUT0=4"), "--dim INPUT0: not an input with variable dims"),
])
def test_bad_arguments_fail_before_measuring(example: Path, args: tuple[str, ...], needle: str) -> None:
    proc = _ferry("profile", "--model-repository", str(example), *args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_module_imports_neither_protos_nor_onnxruntime() -> None:
    proc = _ferry(python=("-c", "import sys, workers.profile; "
                          "print(sorted(m for m in ('protos', 'onnxruntime', 'matplotlib') if m in sys.modules))"))
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ------------------------------------------------------------------------- pure logic --


def _m(size: int, ips: float, p99: float, error: str = "") -> Measurement:
    return Measurement(size, size, 100, 1.0, ips / size, ips, p99 / 2, p99, 0.0, error)


CHEAP_SLOW = PoolResult("cpu", 1.0, rows=(_m(1, 400, 1.0), _m(8, 1000, 4.0), _m(32, 1200, 30.0)))
PRICEY_FAST = PoolResult("gpu", 5.0, rows=(_m(1, 2000, 0.5), _m(8, 10000, 1.0), _m(64, 40000, 20.0)))


def _alloc(o: Option | None) -> dict[str, tuple[int, int]]:
    assert o is not None
    return {a.pool: (a.workers, a.batch_size) for a in o.allocations}


def test_plan_low_load_takes_the_cheap_pool() -> None:
    p = plan([PRICEY_FAST, CHEAP_SLOW], target_rps=500, p99_ms=10)
    assert _alloc(p.best) == {"cpu": (1, 8)}
    assert p.best is not None and p.best.hourly_cost == 1.0
    assert p.best.cost_per_million == pytest.approx(1.0 / (500 * 3600) * 1e6)
    assert [o.allocations[0].pool for o in p.single_pool] == ["cpu", "gpu"]


def test_plan_high_load_mixes_pools_at_the_lowest_cost() -> None:
    # Per inference the fast pool is cheaper (5/10000 < 1/1000 at the sizes within 10 ms).
    # 21000/s: gpu alone needs 3 workers (15/h), cpu alone 21 (21/h); 2 gpu + 1 cpu carry it for 11/h.
    p = plan([CHEAP_SLOW, PRICEY_FAST], target_rps=21000, p99_ms=10)
    assert _alloc(p.best) == {"gpu": (2, 8), "cpu": (1, 8)}
    assert p.best is not None and p.best.hourly_cost == 11.0 and p.best.capacity == 21000
    assert {o.allocations[0].pool: o.hourly_cost for o in p.single_pool} == {"gpu": 15.0, "cpu": 21.0}


def test_plan_uses_the_best_size_within_the_bound() -> None:
    # A looser bound admits gpu's batch 64 (40000/s): one worker carries 21000/s.
    assert _alloc(plan([CHEAP_SLOW, PRICEY_FAST], target_rps=21000, p99_ms=25).best) == {"gpu": (1, 64)}
    # A tight one leaves gpu only batch 1 and cpu nothing: 11 gpu workers.
    assert _alloc(plan([CHEAP_SLOW, PRICEY_FAST], target_rps=21000, p99_ms=0.5).best) == {"gpu": (11, 1)}


def test_plan_prefers_the_lower_latency_size_among_equally_cheap_ones() -> None:
    # Throughput levels off (figures of the example MLP): batches 4, 8 and 32 all need 3 workers.
    flat = PoolResult("cpu", 0.17, rows=(_m(4, 36677.4, 0.144), _m(8, 38362.8, 0.250), _m(32, 38468.4, 0.915)))
    assert _alloc(plan([flat], target_rps=100000, p99_ms=1).best) == {"cpu": (3, 4)}
    assert _alloc(plan([flat], target_rps=112000, p99_ms=1).best) == {"cpu": (3, 8)}


def test_plan_reports_none_and_the_closest_when_no_pool_meets_the_bound() -> None:
    p = plan([CHEAP_SLOW, PRICEY_FAST], target_rps=100, p99_ms=0.1)
    assert p.best is None and p.single_pool == ()
    assert p.closest is not None and (p.closest.pool, p.closest.batch_size, p.closest.p99_ms) == ("gpu", 1, 0.5)


def test_plan_ignores_unavailable_pools_and_failed_rows() -> None:
    gone = PoolResult("gpu", 0.01, "onnx-gpu", unavailable="no CUDA")
    failed = PoolResult("neuron", 0.01, rows=(_m(8, 1e9, 0.001, error="out of memory"),))
    p = plan([gone, failed, CHEAP_SLOW], target_rps=2500, p99_ms=10)
    assert _alloc(p.best) == {"cpu": (3, 8)}
    assert plan([gone, failed], target_rps=1, p99_ms=10).closest is None
    with pytest.raises(ValueError):
        plan([CHEAP_SLOW], target_rps=0, p99_ms=10)


def test_plan_matches_brute_force_on_random_pools() -> None:
    rng = random.Random(7)
    for _ in range(300):
        pools = [PoolResult(f"p{i}", rng.choice([0.0, 0.3, 1.0, 2.5, 7.0]),
                            rows=(_m(1, rng.uniform(10, 500), 1.0), _m(8, rng.uniform(50, 3000), 5.0)))
                 for i in range(3)]
        target = rng.uniform(100, 20000)
        got = plan(pools, target, p99_ms=10).best
        assert got is not None and got.capacity >= target - 1e-6
        assert got.hourly_cost == pytest.approx(_brute(pools, target)), (pools, target)
        assert len(got.allocations) <= 2


def _brute(pools: list[PoolResult], target: float) -> float:
    """Cheapest one- or two-pool worker counts, every split tried (batch 8 is each pool's fastest within 10 ms)."""
    best = float("inf")
    rates = [max(m.inferences_per_s for m in r.rows) for r in pools]
    for i, j in itertools.combinations_with_replacement(range(len(pools)), 2):
        for a in range(0, int(target / rates[i]) + 2):
            rest = target - a * rates[i]
            b = 0 if rest <= 0 or i == j else -(-rest // rates[j])
            if i == j and rest > 0:
                continue
            best = min(best, a * pools[i].cost_per_hour + b * pools[j].cost_per_hour)
    return best


def test_summarize_and_percentiles() -> None:
    latencies_ns = [1_000_000] * 98 + [5_000_000, 9_000_000]  # 100 calls, two slow ones
    m = summarize(4, 4, latencies_ns, elapsed_s=0.5, cost_per_hour=2.0)
    assert m.calls == 100 and m.batches_per_s == 200 and m.inferences_per_s == 800
    assert m.p50_ms == 1.0 and m.p99_ms == 5.0
    assert m.cost_per_million == pytest.approx(2.0 / (800 * 3600) * 1e6)
    assert percentile([1.0, 2.0, 3.0], 99) == 3.0  # few calls: p99 is the slowest, never below it


def test_measure_warms_up_then_times_each_call() -> None:
    now = [0]
    calls = []

    def clock() -> int:
        return now[0]

    def call() -> None:
        calls.append(now[0])
        now[0] += 2_000_000  # every call takes 2 ms

    latencies, elapsed = measure(call, seconds=0.1, clock=clock)
    warmup = len(calls) - len(latencies)
    assert warmup == 5  # WARMUP_CALLS, which outlast 10% of 0.1 s here
    assert latencies == [2_000_000] * 50 and elapsed == pytest.approx(0.1)


def test_default_batch_sizes() -> None:
    assert default_batch_sizes(32, ()) == (1, 2, 4, 8, 16, 32)
    assert default_batch_sizes(24, ()) == (1, 2, 4, 8, 16, 24)
    assert default_batch_sizes(8, (8, 2)) == (2, 8)
    assert default_batch_sizes(0, ()) == (1,)
