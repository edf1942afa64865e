"""Routing across pools through a real cluster: preference for the cheapest pool, spill-over,
re-routing when a pool loses every worker, UNAVAILABLE when a model has none, heartbeat expiry,
and a worker that joins under load.

The model ``routed`` may run on two CPU pools, ``cheap`` (cost 1) and ``pricey`` (cost 5), each
with its own workers (onnxruntime CPU, custom pool names).  Which pool ran a batch is what the
pools' workers announce on their done channels (``ferry:{p:<pool>}:done``), which the test
hears as any subscriber would.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.conftest import Cluster
from tests.models import _paced_graph, _save

CHEAP = ("--pool", "cheap", "--runtime", "onnx-cpu")
PRICEY = ("--pool", "pricey", "--runtime", "onnx-cpu")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routing")
    # ~1-2 ms per row on one core: a few concurrent clients saturate one worker.
    _save(root / "routed", 1, _paced_graph(256, 4), """name: "routed"
max_batch_size: 4
parameters { key: "ferry.pools" value: { string_value: "pricey=5, cheap=1" } }
""")
    _save(root / "lonely", 1, _paced_graph(64, 1), """name: "lonely"
max_batch_size: 4
parameters { key: "ferry.pools" value: { string_value: "cheap" } }
""")
    return root


class DoneNotices:
    """Counts the done notices of every pool, from a pub/sub subscription of its own."""

    def __init__(self, client: redis.Redis, pools: tuple[str, ...]) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, float] = {}
        self._client = client
        self._channels = [f"ferry:{{p:{p}}}:done" for p in pools]
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._subscribed.wait(10), "could not subscribe to the done channels"

    def _run(self) -> None:
        # Subscribed and read on one thread: redis-py's pub/sub connection is not thread-safe.
        pubsub = self._client.pubsub()
        pubsub.subscribe(*self._channels)
        try:
            while not self._stop.is_set():
                msg = pubsub.get_message(timeout=0.05)
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    if msg["data"] == len(self._channels):
                        self._subscribed.set()
                    continue
                pool = msg["channel"].decode().split("{p:")[1].split("}")[0]
                self.counts[pool] += 1
                self.first.setdefault(pool, time.monotonic())
        finally:
            pubsub.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _cluster(repo: Path, tmp_path: Path, *workers: tuple[str, ...], broker_args: tuple[str, ...] = ()) -> Cluster:
    return Cluster(repo, tmp_path, workers=0, worker_args=workers, broker_args=broker_args)


def _infer(c: tc.InferenceServerClient, model: str, value: float, timeout_s: float = 20.0) -> float:
    x = tc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return float(c.infer(model, [x], client_timeout=timeout_s).as_numpy("y")[0, 0])


def _load(cluster: Cluster, n: int, threads: int, model: str = "routed", timeout_s: float = 20.0) -> list[str]:
    """``n`` requests from ``threads`` concurrent clients; each ends as 'OK' or its status."""
    def one(i: int) -> str:
        try:
            _infer(cluster.client(), model, 0.001 * (i % 7), timeout_s)
            return "OK"
        except InferenceServerException as exc:
            return f"{exc.status()}: {exc.message()}"

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def _finish(cluster: Cluster, notices: list[DoneNotices]) -> None:
    for n in notices:  # before Redis goes
        n.close()
    # A killed worker's registration lives until its heartbeat TTL; the registry then forgets it.
    # Wait for that rather than for the zset alone: a test that ends within the TTL of the kill
    # would otherwise find the registration still there (worker ids are host-pid-random).
    dead = {str(p.pid) for _, p in cluster.procs if p.poll() is not None}
    r = cluster.redis_client()

    def lingering() -> bool:
        ids = [k.decode().removeprefix("ferry:worker:") for k in r.scan_iter("ferry:worker:*")]
        ids += [m.decode() for m in r.zrange("ferry:workers", 0, -1)]
        return any(i.split("-")[-2] in dead for i in ids)

    deadline = time.monotonic() + 10
    while lingering():
        assert time.monotonic() < deadline, "a dead worker stayed in the registry"
        time.sleep(0.05)
    codes = cluster.stop()
    assert all(code in (0, -9) for group in codes.values() for code in group), codes
    assert cluster.leaked_keys() == [], f"{codes}\n{cluster.logs()}"
    cluster.close()


def _worker_of(cluster: Cluster, pool: str) -> subprocess.Popen[bytes]:
    return next(p for role, p in cluster.procs if role == "worker" and pool in p.args)


def _wait_live(cluster: Cluster, pool: str, count: int, within_s: float = 10.0) -> None:
    r = cluster.redis_client()
    deadline = time.monotonic() + within_s
    while True:
        now_ms = int(time.time() * 1000)
        ids = r.zrangebyscore("ferry:workers", now_ms, "+inf")
        infos = [r.get(f"ferry:worker:{i.decode()}") for i in ids]
        live = sum(1 for raw in infos if raw and f'"pool":"{pool}"'.encode() in raw)
        if live == count:
            return
        assert time.monotonic() < deadline, f"pool {pool}: {live} live workers, want {count}"
        time.sleep(0.05)


def test_low_load_runs_on_the_cheapest_pool_and_overload_spills(repo: Path, tmp_path: Path) -> None:
    notices: list[DoneNotices] = []
    cluster = _cluster(repo, tmp_path, CHEAP, PRICEY)
    try:
        _wait_live(cluster, "pricey", 1)
        _wait_live(cluster, "cheap", 1)
        seen = DoneNotices(cluster.redis_client(), ("cheap", "pricey"))
        notices.append(seen)
        c = cluster.client()
        # Live in Redis is not yet known to the broker (its registry view and done-notice subscription
        # catch up within a second or so, slower on a loaded CI machine): until three requests in a row
        # have run on the cheap pool, the broker is still starting; then count afresh.
        deadline = time.monotonic() + 15
        streak = 0
        while streak < 3:
            before = seen.counts["cheap"]
            _infer(c, "routed", 0.5)
            time.sleep(0.05)  # the notice is published just after the reply
            streak = streak + 1 if seen.counts["cheap"] > before else 0
            assert time.monotonic() < deadline, f"the broker never routed to the cheap pool: {seen.counts}"
        seen.counts.clear()
        for i in range(20):  # one at a time: the cheap pool always has room
            _infer(c, "routed", 0.01 * i)
        time.sleep(0.2)  # the last notices are published after the replies
        assert seen.counts["cheap"] >= 1 and seen.counts["pricey"] == 0, seen.counts
        # 16 clients against one cheap worker (max batch 4, pool depth 2): the cheap pool fills up
        # and the rest spills to the pricey one.
        assert _load(cluster, 400, 16) == ["OK"] * 400
        time.sleep(0.2)
        assert seen.counts["pricey"] >= 1, seen.counts
        assert seen.counts["cheap"] > seen.counts["pricey"] / 4, seen.counts
    finally:
        _finish(cluster, notices)


def test_a_pool_that_loses_every_worker_hands_its_traffic_to_the_other(repo: Path, tmp_path: Path) -> None:
    notices: list[DoneNotices] = []
    cluster = _cluster(repo, tmp_path, CHEAP, PRICEY)
    try:
        _wait_live(cluster, "pricey", 1)
        cheap = _worker_of(cluster, "cheap")
        results: list[str] = []
        loader = threading.Thread(target=lambda: results.extend(_load(cluster, 300, 8, timeout_s=30)))
        loader.start()
        time.sleep(0.5)
        cheap.send_signal(signal.SIGKILL)  # its batches stay in the cheap stream, unread or half-run
        cheap.wait(10)  # dead before _finish looks for its registration
        loader.join(60)
        assert not loader.is_alive()
        # Every request is answered: those the dead worker held are moved to the pricey pool once
        # its heartbeat expires, and new ones go there directly.
        assert results == ["OK"] * 300, Counter(results)
        r = cluster.redis_client()
        assert r.xlen("ferry:{p:cheap}:batches") == 0
    finally:
        _finish(cluster, notices)


def test_a_model_without_a_live_worker_fails_with_unavailable(repo: Path, tmp_path: Path) -> None:
    notices: list[DoneNotices] = []
    cluster = _cluster(repo, tmp_path, CHEAP, PRICEY, broker_args=("--no-worker-grace-s", "0.5"))
    try:
        c = cluster.client()
        assert _infer(c, "lonely", 1.0) >= 0
        cheap = _worker_of(cluster, "cheap")
        cheap.send_signal(signal.SIGKILL)
        cheap.wait(10)  # dead before _finish looks for its registration
        killed = time.monotonic()
        # Keep asking: first the requests wait for the dead worker (its heartbeat has 3 s to
        # expire), then the broker fails what it holds and the gateway refuses new ones.
        results: list[str] = []
        while not any(r != "OK" for r in results):
            assert time.monotonic() - killed < 10, Counter(results)
            results += _load(cluster, 8, 4, "lonely", timeout_s=20)
        statuses = Counter(r.split(":")[0] for r in results)
        assert set(statuses) <= {"OK", "StatusCode.UNAVAILABLE"}, statuses
        failed = next(r for r in results if r != "OK")
        assert "no live worker" in failed and "ferry worker --pool cheap" in failed, failed
        # Heartbeat expiry removed the dead worker: the model is no longer ready, the other is.
        assert not c.is_model_ready("lonely") and c.is_model_ready("routed")
    finally:
        _finish(cluster, notices)


def test_a_worker_joining_under_load_takes_work_within_a_second(repo: Path, tmp_path: Path) -> None:
    notices: list[DoneNotices] = []
    cluster = _cluster(repo, tmp_path, PRICEY, CHEAP)
    try:
        _wait_live(cluster, "cheap", 1)
        cheap = _worker_of(cluster, "cheap")
        cheap.send_signal(signal.SIGTERM)  # the cheap pool scales to 0...
        assert cheap.wait(30) == 0
        _wait_live(cluster, "cheap", 0)
        seen = DoneNotices(cluster.redis_client(), ("cheap",))
        notices.append(seen)
        results: list[str] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                results.extend(_load(cluster, 16, 8))

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        cluster.spawn("worker", *CHEAP, "--worker-id", "late-joiner")  # ...and back to 1 under load
        r = cluster.redis_client()
        deadline = time.monotonic() + 20
        while not r.exists("ferry:worker:late-joiner"):
            assert time.monotonic() < deadline, "the new worker never registered"
            time.sleep(0.01)
        registered = time.monotonic()
        time.sleep(2)
        stop.set()
        loader.join(60)
        assert results and set(results) == {"OK"}, Counter(results)
        assert "cheap" in seen.first, "the new worker never ran a batch"
        assert seen.first["cheap"] - registered < 1.0, seen.first["cheap"] - registered
    finally:
        _finish(cluster, notices)
