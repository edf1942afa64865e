"""Crash recovery through a real cluster: a killed worker's batch runs elsewhere, a poison request
is isolated and dead-lettered, a killed broker's requests are taken over by another broker.

Workers die for real (SIGKILL).  What kills them is the worker's fault-injection knob
``--fault-exit-on-id``: a worker handed a request with that id kills itself, as a model that
crashes its process would.  Everything else (reclaiming, splitting, dead-lettering) is the
production path.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests.conftest import Cluster, require_edge
from tests.models import _save, slow_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recovery")
    one = numpy_helper.from_array(np.ones((2,), dtype=np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "plus_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[one],
    )
    _save(root / "plus_one", 1, graph, 'name: "plus_one"\nmax_batch_size: 8\n')
    slow_model(root)
    return root


def _plus_one(c: tc.InferenceServerClient, value: float, request_id: str = "", timeout_s: float = 60) -> float:
    x = tc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[value, -value]], dtype=np.float32))
    y = c.infer("plus_one", [x], request_id=request_id, client_timeout=timeout_s).as_numpy("y")
    assert y[0, 1] == np.float32(-value) + 1, "the second element went wrong"
    return float(y[0, 0])


def _wait_exit(p: subprocess.Popen[bytes], within_s: float = 20) -> int:
    return p.wait(within_s)


def _finish(cluster: Cluster, *, dead_letters: int = 0) -> None:
    r = cluster.redis_client()
    dead = r.xrange("ferry:{p:cpu}:dead")
    assert len(dead) == dead_letters, dead
    r.delete("ferry:{p:cpu}:dead")
    cluster.stop_cleanly()
    cluster.close()


def test_batch_of_a_killed_worker_runs_on_another(repo: Path, tmp_path: Path) -> None:
    cluster = Cluster(repo, tmp_path, workers=0, worker_args=(("--fault-exit-on-id", "crash"),),
                      broker_args=("--no-worker-grace-s", "60"))
    try:
        doomed = cluster.procs[-2][1]  # the worker (the gateway was started last)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_plus_one, cluster.client(), 41.0, "crash")
            assert _wait_exit(doomed) == -9, "the fault did not kill the worker"
            cluster.spawn("worker")  # no fault: it takes the dead worker's batch over
            assert answer.result(60) == 42.0
        assert "took over 1 batch(es) of dead workers: 1 to run again" in cluster.logs()
        cluster.procs = [(role, p) for role, p in cluster.procs if p is not doomed]
        _finish(cluster)
    finally:
        cluster.close()


def test_poison_request_is_split_out_and_dead_lettered(repo: Path, tmp_path: Path) -> None:
    fault = ("--fault-exit-on-id", "poison", "--max-attempts", "2")
    cluster = Cluster(repo, tmp_path, workers=0, worker_args=(fault, fault),
                      broker_args=("--no-worker-grace-s", "60"))
    deaths = 0
    done = threading.Event()

    def restart_dead_workers() -> None:
        # What Kubernetes or a supervisor does: a dead worker is replaced.
        nonlocal deaths
        while not done.is_set():
            for i, (role, p) in enumerate(cluster.procs):
                if role == "worker" and p.poll() is not None:
                    assert p.returncode == -9, cluster.logs()
                    deaths += 1
                    cluster.procs[i] = ("dead", p)
                    cluster.spawn("worker", *fault)
            time.sleep(0.05)

    supervisor = threading.Thread(target=restart_dead_workers, daemon=True)
    supervisor.start()
    try:
        client = cluster.client()

        def one(i: int) -> str:
            try:
                return str(_plus_one(client, float(i), "poison" if i == 0 else f"ok-{i}"))
            except InferenceServerException as exc:
                return f"{exc.status()}: {exc.message()}"

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        done.set()
        supervisor.join(5)
        assert results[1:] == ["2.0", "3.0", "4.0"], results
        assert results[0].startswith("StatusCode.INTERNAL: ") and "dead-lettered" in results[0], results[0]
        # At least max_attempts deaths; at most one more per halving of a batch of 4.
        assert 2 <= deaths <= 4, deaths
        why = cluster.redis_client().xrange("ferry:{p:cpu}:dead")[0][1][b"why"].decode()
        assert "max_attempts 2" in why, why
        cluster.procs = [(role, p) for role, p in cluster.procs if role != "dead"]
        _finish(cluster, dead_letters=1)
    finally:
        done.set()
        cluster.close()


def test_requests_of_a_killed_broker_are_taken_over(repo: Path, tmp_path: Path) -> None:
    # Two brokers share the request stream; one worker and a slow model keep most requests
    # queued in the brokers (pool_depth 1) when one of them is killed.
    cluster = Cluster(repo, tmp_path, workers=1, broker_args=("--pool-depth", "1"))
    try:
        cluster.spawn("broker", "--pool-depth", "1")
        client = cluster.client()

        def slow(i: int) -> str:
            x = tc.InferInput("x", [1], "FP32")
            x.set_data_from_numpy(np.array([1.0 + i / 100], dtype=np.float32))
            try:
                client.infer("slow", [x], request_id=f"s{i}", client_timeout=60)
                return "OK"
            except InferenceServerException as exc:
                return f"{exc.status()}: {exc.message()}"

        r = cluster.redis_client()
        with ThreadPoolExecutor(16) as pool:
            results = pool.map(slow, range(16))
            # Kill a broker that holds requests it has not acknowledged (its consumer name,
            # host-pid-random, says which process it is).
            deadline = time.monotonic() + 20
            while not (holders := [c["name"].decode() for c in r.xinfo_consumers("ferry:{m:slow}:v1:requests",
                                                                                   "brokers") if c["pending"]]):
                assert time.monotonic() < deadline, "no broker ever held a request"
                time.sleep(0.01)
            pid = int(holders[0].split("-")[-2])
            victim = next(p for role, p in cluster.procs if role == "broker" and p.pid == pid)
            victim.kill()
            assert list(results) == ["OK"] * 16
        assert "from dead brokers" in cluster.logs()
        assert victim.wait(5) == -9
        cluster.procs = [(role, p) for role, p in cluster.procs if p is not victim]
        _finish(cluster)
    finally:
        cluster.close()


@pytest.mark.parametrize("edge", [False, True], ids=["gateway", "edge"])
def test_a_request_lost_with_its_connection_is_sent_again_without_more_traffic(repo: Path, tmp_path: Path,
                                                                                edge: bool) -> None:
    """A failover at the end of a burst: the gateway's connection is replaced and what it had written
    is gone, and no further request comes to make it notice.  Its heartbeat notices, and re-sends."""
    if edge:
        require_edge()
    cluster = Cluster(repo, tmp_path, edge=edge)
    try:
        client = cluster.client()
        assert _plus_one(client, 1.0) == 2.0  # everything connected
        # No broker, so the next request stays in the stream where the "failover" can lose it.
        broker = next(p for role, p in cluster.procs if role == "broker")
        broker.kill()
        broker.wait()
        cluster.procs = [(role, p) for role, p in cluster.procs if p is not broker]
        r = cluster.redis_client()
        stream, queued = "ferry:{m:plus_one}:v1:requests", "ferry:{m:plus_one}:v1:queued"
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_plus_one, client, 2.0, "", 20)
            deadline = time.monotonic() + 10
            while not r.xlen(stream):
                assert time.monotonic() < deadline, "the request never reached its stream"
                time.sleep(0.01)
            # What a failover to a replica that had not received the write loses: the entry and its
            # admission (one script wrote both); then every connection is replaced.
            r.xtrim(stream, maxlen=0)
            r.decr(queued)
            r.client_kill_filter(_type="normal", skipme=True)
            cluster.spawn("broker")
            assert answer.result(timeout=30) == 3.0
        assert "queueing 1 waiting request(s) again" in cluster.logs()
        deadline = time.monotonic() + 10
        while r.zcard("ferry:brokers") > 1:  # the killed broker's registration, until it expires
            assert time.monotonic() < deadline, r.zrange("ferry:brokers", 0, -1, withscores=True)
            time.sleep(0.05)
        _finish(cluster)
    finally:
        cluster.close()
