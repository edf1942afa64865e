"""The short fault-injection runs (benchmarks/chaos.py): every kind of process killed under load,
Redis restarted on its AOF, its link cut, a Sentinel-managed Redis failed over (planned, and by
killing the primary), a Redis Cluster primary killed; not one request lost, late, wrong or
answered twice.  The Sentinel and Cluster runs are marked ``chaos`` and run with scripts/chaos,
not in the default tests. The Sentinel run used to fail now and then (3 of about 37 runs by
2026-11-27): request entries left pending because connections opened before a planned failover kept
writing to the demoted primary, which stays writable for ~8 s (fixed: ferry/resp_sentinel.py,
tests/test_sentinel.py); then one request answered after its deadline in 47 runs, consistent with
a connection replaced at the end of the load and nothing re-sending what it carried (fixed: the
gateway re-sends within a heartbeat, tests/test_recovery.py).  With both: 28 of 28 passed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _chaos(tmp_path: Path, *args: str) -> tuple[dict[str, object], str]:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--rate", "60", "--stream-rate", "10", "--stream-len", "20",
         "--json", str(out), "--keep-logs", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    # The processes' logs stay for a failing run (their path is the last line of its output).
    logs = next((Path(ln.split(": ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("logs: ")), None)
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    for count in ("wrong", "late", "never", "twice", "expired"):
        assert result[count] == 0, f"{count}: {result[count]}\n{proc.stdout}"
    assert result["leaks"] == [], proc.stdout
    assert all(code == 0 for code in result["codes"].values()), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    if logs is not None:
        shutil.rmtree(logs.parent, ignore_errors=True)
    return result, proc.stdout


@pytest.mark.timeout(180)
def test_killed_processes_and_redis_restart_lose_nothing(tmp_path: Path) -> None:
    # Faults at 4, 8, 12 and 16 s: one of each kind (a fault needs half an interval of load after it).
    result, stdout = _chaos(tmp_path, "--duration-s", "19", "--interval-s", "4")
    injected = {what.split(",")[0].split()[1].split("-")[0] for _, what in result["faults"]}  # type: ignore[attr-defined]
    assert injected == {"worker", "broker", "gateway", "redis"}, result["faults"]
    assert result["ok"] > 500, stdout  # type: ignore[operator]


@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_sentinel_failovers_lose_nothing(tmp_path: Path) -> None:
    result, stdout = _chaos(tmp_path, "--sentinel", "--faults", "sentinel-failover,kill-primary",
                            "--duration-s", "20", "--interval-s", "5")
    assert len(result["faults"]) >= 3, stdout  # type: ignore[arg-type]
    assert result["ok"] > 500, stdout  # type: ignore[operator]


def _can_make_netns() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"ferry-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _can_make_netns(), reason="needs root and `ip netns` (iproute2) to cut Redis's link")
def test_cut_redis_link_loses_nothing(tmp_path: Path) -> None:
    # A cut shorter than redis_timeout_s (2 s) is ridden out; a longer one gives UNAVAILABLE.
    result, stdout = _chaos(tmp_path, "--netns", "--faults", "cut-link,kill-worker", "--cut-s", "1.5",
                            "--duration-s", "13.5", "--interval-s", "5")
    assert any("link cut" in what for _, what in result["faults"]), stdout  # type: ignore[attr-defined]
    assert result["ok"] > 500, stdout  # type: ignore[operator]


@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_redis_cluster_failover_loses_nothing(tmp_path: Path) -> None:
    # A cluster failover takes 2-3 s (node timeout 1 s, then an election): requests wait for it
    # with a redis_timeout_s above that.
    result, stdout = _chaos(tmp_path, "--cluster", "--faults", "kill-cluster-primary,kill-worker",
                            "--set", "FERRY_REDIS_TIMEOUT_S=5", "--duration-s", "16", "--interval-s", "5")
    assert any("cluster primary" in what for _, what in result["faults"]), stdout  # type: ignore[attr-defined]
    assert result["ok"] > 500, stdout  # type: ignore[operator]
