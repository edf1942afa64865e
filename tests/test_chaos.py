"""The short fault-injection run (benchmarks/chaos.py): every kind of process killed under load,
Redis restarted on its AOF, and not one request lost, late, wrong or answered twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_faults_under_load_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--duration-s", "24", "--interval-s", "4", "--rate", "60",
         "--stream-rate", "10", "--stream-len", "20", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    injected = {what.split(",")[0].split()[1].split("-")[0] for _, what in result["faults"]}
    assert injected == {"worker", "broker", "gateway", "redis"}, result["faults"]
    assert result["ok"] > 500, proc.stdout
    for count in ("wrong", "late", "never", "twice", "expired"):
        assert result[count] == 0, f"{count}: {result[count]}\n{proc.stdout}"
    assert result["leaks"] == [], proc.stdout
    assert all(code == 0 for code in result["codes"].values()), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
