"""Scheduling rules through a real cluster: priorities, deadlines, queue policy, bounds, cancellation, shapes.

To make requests wait in the broker deterministically, a test pauses the
worker (SIGSTOP) and fills its pool's room with two *filler* batches; every
request sent after that waits in the broker until the worker resumes.  The
order in which batches then run is the order in which their callbacks fire:
``paced`` takes ~10 ms per request, far longer than the reply path.  The
worker is paused for well under its 3 s heartbeat expiry.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import redis
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.conftest import Cluster

POOL_STREAM = "ferry:{p:cpu}:batches"


def _x(value: float = 0.01) -> list[tc.InferInput]:
    inp = tc.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return [inp]


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting until {what}")
        time.sleep(0.005)


def _queued(r: redis.Redis, model: str) -> int:
    return int(r.get(f"ferry:{{m:{model}}}:v1:queued") or 0)


def _all_read(r: redis.Redis, model: str) -> bool:
    groups = r.xinfo_groups(f"ferry:{{m:{model}}}:v1:requests")
    return all(g["lag"] == 0 for g in groups)


class Calls:
    """Callbacks of async calls, in the order they fired."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.results: dict[str, Any] = {}
        self.errors: dict[str, InferenceServerException] = {}
        self.at: dict[str, float] = {}
        self._lock = threading.Lock()

    def cb(self, tag: str) -> Callable[[Any, Any], None]:
        def done(result: Any, error: Any) -> None:
            with self._lock:
                self.order.append(tag)
                self.at[tag] = time.monotonic()
                if error is not None:
                    self.errors[tag] = error
                else:
                    self.results[tag] = result
        return done

    def wait(self, n: int, timeout_s: float = 20.0) -> None:
        _until(lambda: len(self.order) >= n, f"{n} calls answered (got {self.order})", timeout_s)


@contextmanager
def held(cluster: Cluster, calls: Calls, filler: str = "paced") -> Iterator[redis.Redis]:
    """Pause the worker and fill its pool's room, so the next requests wait in the broker."""
    (worker,) = [p for role, p in cluster.procs if role == "worker" and p.poll() is None]
    r = cluster.redis_client()
    c = cluster.client()
    worker.send_signal(signal.SIGSTOP)
    try:
        for i in range(2):
            c.async_infer(filler, [_slow_x()] if filler == "slow" else _x(), calls.cb(f"fill{i}"))
        _until(lambda: r.xlen(POOL_STREAM) == 2 and _queued(r, filler) == 0, "the pool's room is full")
        yield r
    finally:
        worker.send_signal(signal.SIGCONT)


def _stats(cluster: Cluster, model: str) -> dict[str, Any]:
    stats: dict[str, Any] = cluster.client().get_inference_statistics(model, as_json=True)["model_stats"][0]
    return stats


def test_higher_priority_runs_first(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    with held(cluster, calls) as r:
        # One at a time: two calls sent back to back may reach the gateway in either order.
        for n, (name, level) in enumerate([("low0", 2), ("low1", 2), ("high0", 1), ("high1", 1)], 1):
            c.async_infer("paced", _x(), calls.cb(name), priority=level)
            _until(lambda n=n: _queued(r, "paced") == n and _all_read(r, "paced"), f"{name} queued")
    calls.wait(6)
    assert calls.errors == {}
    assert calls.order[2:] == ["high0", "high1", "low0", "low1"]


def test_priority_beyond_the_models_levels_is_refused(cluster: Cluster) -> None:
    with pytest.raises(InferenceServerException) as info:
        cluster.client().infer("paced", _x(), priority=3)
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "priority_levels 2" in str(info.value.message())


def test_a_full_queue_refuses_at_once_and_names_its_bound(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    with held(cluster, calls) as r:
        for i in range(4):
            c.async_infer("paced", _x(), calls.cb(f"q{i}"))
        _until(lambda: _queued(r, "paced") == 4, "four requests queued")
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            c.infer("paced", _x(), client_timeout=5)
        refused_in = time.monotonic() - started
    assert str(info.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "max_queue_size is 4" in str(info.value.message())
    assert refused_in < 1.0  # at once, not after some wait
    calls.wait(6)
    assert calls.errors == {}  # everything admitted was answered


def test_a_request_that_cannot_make_its_deadline_is_rejected_before_it(cluster: Cluster) -> None:
    c = cluster.client()
    for _ in range(3):  # the broker learns that a `slow` call takes tens of milliseconds or more
        c.infer("slow", [_slow_x()])
    before = _fails(cluster, "slow")
    calls = Calls()
    with held(cluster, calls, filler="slow"):
        sent = time.monotonic()
        c.async_infer("slow", [_slow_x()], calls.cb("doomed"), client_timeout=1.0)
        calls.wait(1, timeout_s=5)
    err = calls.errors["doomed"]
    assert str(err.status()) == "StatusCode.DEADLINE_EXCEEDED"
    assert "cannot finish before its deadline" in str(err.message())
    assert calls.at["doomed"] - sent < 1.0  # rejected early: the client's deadline had not come yet
    calls.wait(3)
    _until(lambda: _fails(cluster, "slow") == before + 1, "the rejection counted as a failure")


def _fails(cluster: Cluster, model: str) -> int:
    return int(_stats(cluster, model)["inference_stats"]["fail"].get("count", 0))


def _slow_x() -> tc.InferInput:
    inp = tc.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.ones((1,), np.float32))
    return inp


def test_queue_timeout_from_the_request_rejects(cluster: Cluster) -> None:
    calls = Calls()
    with held(cluster, calls):
        cluster.client().async_infer("paced", _x(), calls.cb("timed"), timeout=50_000)
        calls.wait(1, timeout_s=5)
    err = calls.errors["timed"]
    assert str(err.status()) == "StatusCode.DEADLINE_EXCEEDED"
    assert "timed out in the queue" in str(err.message())
    calls.wait(3)


def test_delay_lets_punctual_requests_go_first(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    with held(cluster, calls) as r:
        c.async_infer("delayed", _x(), calls.cb("late"), timeout=1)  # out of time at once: delayed
        _until(lambda: _queued(r, "delayed") == 1 and _all_read(r, "delayed"), "the late request queued")
        c.async_infer("delayed", _x(), calls.cb("punctual"))
        _until(lambda: _queued(r, "delayed") == 2 and _all_read(r, "delayed"), "the punctual request queued")
    calls.wait(4)
    assert calls.errors == {}
    assert calls.order[2:] == ["punctual", "late"]


def test_cancelled_call_leaves_the_queue_and_never_runs(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    with held(cluster, calls) as r:
        ctx = c.async_infer("paced", _x(), calls.cb("gone"))
        _until(lambda: _queued(r, "paced") == 1 and _all_read(r, "paced"), "the request queued")
        ctx.cancel()
        # The broker took it out of its queue (the pool had no room, so it was not dispatched).
        _until(lambda: _queued(r, "paced") == 0, "the cancelled request left the queue")
        assert r.xlen(POOL_STREAM) == 2
    calls.wait(3)
    assert str(calls.errors["gone"].status()) == "StatusCode.CANCELLED"


def test_closing_a_stream_cancels_its_queued_requests(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    streamed: list[Any] = []
    with held(cluster, calls) as r:
        c.start_stream(callback=lambda result, error: streamed.append((result, error)))
        for i in range(2):
            c.async_stream_infer("paced", _x(), request_id=f"s{i}")
        _until(lambda: _queued(r, "paced") == 2 and _all_read(r, "paced"), "streamed requests queued")
        c.stop_stream(cancel_requests=True)
        _until(lambda: _queued(r, "paced") == 0, "the stream's requests left the queue")
    calls.wait(2)


def test_compiled_batch_sizes_pad_and_strip(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    values = [np.array([[i, -i]], np.float32) for i in range(1, 4)]
    with held(cluster, calls) as r:
        for i, v in enumerate(values):
            inp = tc.InferInput("x", [1, 2], "FP32")
            inp.set_data_from_numpy(v)
            c.async_infer("static", [inp], calls.cb(f"s{i}"))
        _until(lambda: _queued(r, "static") == 3 and _all_read(r, "static"), "three requests queued")
    calls.wait(5)
    assert calls.errors == {}
    for i, v in enumerate(values):
        np.testing.assert_array_equal(calls.results[f"s{i}"].as_numpy("y"), v)  # padding rows cut off
    _until(lambda: _stats(cluster, "static").get("execution_count") == "1", "statistics flushed")
    sizes = {int(b["batch_size"]) for b in _stats(cluster, "static")["batch_stats"]}
    assert sizes == {4}  # three rows ran as the compiled size 4


def test_shape_buckets_pad_and_keep_buckets_apart(cluster: Cluster) -> None:
    c = cluster.client()
    calls = Calls()
    lengths = [3, 4, 6]
    with held(cluster, calls) as r:
        for n in lengths:
            inp = tc.InferInput("x", [1, n], "FP32")
            inp.set_data_from_numpy(np.arange(1, n + 1, dtype=np.float32)[None, :])
            c.async_infer("seq", [inp], calls.cb(f"n{n}"))
        _until(lambda: _queued(r, "seq") == 3 and _all_read(r, "seq"), "three requests queued")
    calls.wait(5)
    assert calls.errors == {}
    for n, bucket in zip(lengths, [4, 4, 8], strict=True):
        y = calls.results[f"n{n}"].as_numpy("y")
        expected = np.zeros((1, bucket), np.float32)
        expected[0, :n] = np.arange(1, n + 1)
        np.testing.assert_array_equal(y, expected)
    # Lengths 3 and 4 share bucket 4 and one run; 6 runs alone in bucket 8.
    _until(lambda: _stats(cluster, "seq").get("inference_count") == "3", "statistics flushed")
    assert _stats(cluster, "seq")["execution_count"] == "2"
    inp = tc.InferInput("x", [1, 9], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 9), np.float32))
    with pytest.raises(InferenceServerException) as info:
        c.infer("seq", [inp])
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "largest shape bucket 8" in str(info.value.message())
