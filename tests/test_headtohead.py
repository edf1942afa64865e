"""benchmarks/headtohead.py refuses peer specs it cannot run, naming what is wrong, before starting anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(("spec", "says"), [
    ("tritonn", "unknown peer 'tritonn'"),
    ("triton@/tmp", "only Ferry peers take a checkout or settings"),
    ("ferry-edge@/nonexistent", "is not a Ferry checkout"),
    ("ferry-edge,gather=1", "settings are KEY=value (environment)"),
])
def test_bad_peer_specs_are_refused(spec: str, says: str) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/headtohead.py", "--b", spec], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert says in proc.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--latency", "--solo"], "it has no --solo"),
    (["--latency", "--calls", "0"], "--segments and --calls must be at least 1"),
    (["--unpinned"], "--unpinned is for --latency"),
])
def test_latency_mode_refuses_what_it_cannot_do(args: list[str], says: str) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/headtohead.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert says in proc.stderr
