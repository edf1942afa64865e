"""Workers give up the CPU once after writing a batch's replies (``yield_after_replies``), so that Redis
and the gateway, where they share the worker's core, pass the replies on first.

Observed from outside with strace on the real processes: the worker's sched_yield calls while it
answers sequential requests (one batch each).  strace is installed by scripts/test; without it, or
where ptrace is not permitted, these tests skip and say why.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.conftest import Cluster

CALLS = 8


def _traced_yields(c: Cluster, role: str, tmp_path: Path) -> int:
    """sched_yield calls the ``role`` process made while answering CALLS + 1 requests one at a time: the
    yield of the last may still be to come when its reply arrives, but each earlier one came before
    the process could take the next request."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/test installs it with apt)")
    pid = next(p.pid for r, p in c.procs if r == role)
    out = tmp_path / f"strace-{role}.txt"
    tracer = subprocess.Popen(["strace", "-f", "-e", "trace=sched_yield", "-o", str(out), "-p", str(pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert tracer.stderr is not None
        first = tracer.stderr.readline()  # "strace: Process N attached ..." once it traces
        if "attached" not in first:
            pytest.skip(f"strace cannot attach here (ptrace not permitted?): {first.strip()}")
        client = c.client()
        x = np.ones((1, 256), dtype=np.float32)
        for _ in range(CALLS + 1):
            inp = tc.InferInput("INPUT0", [1, 256], "FP32")
            inp.set_data_from_numpy(x)
            assert client.infer("mlp", [inp]).as_numpy("OUTPUT0") is not None
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches and flushes its output
        tracer.wait(10)
    return out.read_text().count("sched_yield(")


@pytest.mark.parametrize(("role", "cluster_args"), [
    ("broker", {"workers": 0, "broker_args": ("--colocated-worker",)}),  # `ferry up --edge` on a small host
    ("worker", {"workers": 1}),  # a worker on a pool stream
], ids=["colocated", "stream"])
def test_a_worker_yields_once_per_batch(repo: Path, tmp_path: Path, role: str, cluster_args: dict[str, Any]) -> None:
    c = Cluster(repo, tmp_path, **cluster_args)
    try:
        assert _traced_yields(c, role, tmp_path) >= CALLS, c.logs()
        c.stop_cleanly()
    finally:
        c.close()


def test_switched_off_it_never_yields(repo: Path, tmp_path: Path) -> None:
    c = Cluster(repo, tmp_path, workers=0, broker_args=("--colocated-worker",),
                role_env={"broker": {"FERRY_YIELD_AFTER_REPLIES": "0"}})
    try:
        assert _traced_yields(c, "broker", tmp_path) == 0, c.logs()
    finally:
        c.close()
