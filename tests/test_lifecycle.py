"""`ferry up` end to end, graceful stop, and Redis going away."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from ferry.cluster import COLOCATE_BELOW_CPUS, edge_binary, free_port, usable_cpus
from ferry.lifecycle import cancel_all
from tests.conftest import Cluster, require_edge

ROOT = Path(__file__).resolve().parent.parent


def _mlp_input() -> tc.InferInput:
    x = tc.InferInput("INPUT0", [1, 256], "FP32")
    x.set_data_from_numpy(np.zeros((1, 256), np.float32))
    return x


def _infer_eventually(c: Cluster, x: tc.InferInput, within_s: float = 20) -> None:
    """Retry until the cluster answers again (components reconnect on their own)."""
    client = c.client()
    deadline = time.monotonic() + within_s
    while True:
        try:
            client.infer("mlp", [x], client_timeout=5)
            return
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise AssertionError(c.logs()) from None
            time.sleep(0.1)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}


def test_free_port_skips_a_port_claimed_for_a_listener_not_yet_started(monkeypatch: pytest.MonkeyPatch) -> None:
    # `ferry up --grpc-port P --edge`: P is still free while the gateway picks its private port (the
    # edge binds P later); a benchmark run once got the gateway on P and the edge failed to start.
    import ferry.cluster as cluster

    given, other = free_port(), free_port()
    monkeypatch.setattr(cluster, "_PORTS", iter([given, other]))
    monkeypatch.setattr(cluster, "_CLAIMED", set())
    cluster.claim_port(given)
    assert cluster.free_port() == other


@pytest.mark.parametrize("front", ["gateway", "edge"])
def test_ferry_up_serves_the_example_and_stops_cleanly(tmp_path: Path, front: str) -> None:
    if front == "edge":
        require_edge()
    port = free_port()
    edge = ["--edge"] if front == "edge" else []
    env = _env()
    if front == "edge":
        # The documented way to name the binary: `ferry up` and the edge itself both accept it.
        env["FERRY_EDGE_BINARY"] = edge_binary()
    up = subprocess.Popen([sys.executable, "-m", "ferry.cli", "up", "--grpc-port", str(port), *edge],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert up.stdout is not None
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(lines)
        assert f"127.0.0.1:{port}" in text and "ferry infer" in text, text
        assert ("native edge x1" in text) == (front == "edge"), text
        assert ("a batch leaves when the worker is free" in text) == (front == "edge"), text
        small = usable_cpus() < COLOCATE_BELOW_CPUS  # where the default puts the worker in the broker's process
        assert ("the broker process also runs the first worker" in text) == (front == "edge" and small), text
        assert ("they run under SCHED_BATCH" in text) == small, text
        # What the policy is for: every process it started (Redis, the edge, the Python ones) inherits it.
        children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 3, children
        want = os.SCHED_BATCH if small else os.SCHED_OTHER
        assert all(os.sched_getscheduler(int(pid)) == want for pid in children), children
        out = subprocess.run([sys.executable, "-m", "ferry.cli", "infer", "--url", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30, env=_env(), cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "OUTPUT0 FP32 [1, 10]" in out.stdout
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # Every child (and the Redis it started) is gone.
    ps = subprocess.run(["pgrep", "-f", f"--grpc-port {port}|--listen 127.0.0.1:{port}"], capture_output=True,
                        text=True)
    assert ps.stdout.strip() == ""


@pytest.mark.parametrize("edge", [False, True], ids=["gateway", "edge"])
def test_redis_down_gives_unavailable_within_bounded_time(repo: Path, tmp_path: Path, edge: bool) -> None:
    if edge:
        require_edge()
    c = Cluster(repo, tmp_path, edge=edge)
    try:
        x = _mlp_input()
        client = c.client()
        client.infer("mlp", [x])
        c.redis.proc.send_signal(signal.SIGSTOP)  # unreachable: connections hang, nothing answers
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [x], client_timeout=30)
        elapsed = time.monotonic() - t0
        assert str(info.value.status()) == "StatusCode.UNAVAILABLE", info.value.message()
        assert "Redis" in info.value.message()
        assert elapsed < 10  # redis_timeout_s (2 s) bounds it, not the client's 30 s
        c.redis.proc.send_signal(signal.SIGCONT)
        _infer_eventually(c, x)
    finally:
        c.redis.proc.send_signal(signal.SIGCONT)
        c.stop()
        c.close()


@pytest.mark.parametrize("edge", [False, True], ids=["gateway", "edge"])
def test_cluster_recovers_when_redis_loses_its_data(repo: Path, tmp_path: Path, edge: bool) -> None:
    """A Redis restarted without persistence (here: FLUSHALL) loses groups and registrations; all come back."""
    if edge:
        require_edge()
    c = Cluster(repo, tmp_path, edge=edge)
    try:
        x = _mlp_input()
        client = c.client()
        client.infer("mlp", [x])
        c.redis_client().flushall()
        _infer_eventually(c, x)
        c.stop_ok()
    finally:
        c.close()


def test_cancel_all_outlasts_a_task_that_swallows_its_cancellation() -> None:
    """What redis-py can do to a retry loop: the cancellation arrives as a connection error."""
    swallowed = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # survives the first cancel, as a caught ConnectionError would

    async def main() -> bool:
        task = asyncio.create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_all([task]), 5)
        return task.cancelled()

    assert asyncio.run(main()) and swallowed == [True]


def test_settle_heap_collects_start_up_garbage_then_freezes_what_is_alive() -> None:
    # In a fresh interpreter: freezing pytest's own heap would keep its cycles for the session.
    probe = """
import gc, weakref
from ferry.lifecycle import settle_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

gc.disable()  # nothing may collect it before settle_heap does
garbage = cycle()
alive = Node()
assert garbage() is not None
settle_heap()
print(garbage() is None, gc.get_freeze_count() > 0, not any(o is alive for o in gc.get_objects()))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    collected, frozen, out_of_reach = out.stdout.split()
    assert collected == "True"  # start-up's cyclic garbage went first, rather than frozen for good
    assert frozen == "True"
    assert out_of_reach == "True"  # later collections no longer walk what was alive
