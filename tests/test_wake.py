"""Scale from zero: a model whose pool has no worker keeps its requests waiting (no_worker_grace_s),
the broker raises the pool's wake-up signal (what the Helm chart's KEDA trigger watches), and a
worker that then starts serves the waiting requests and clears the signal."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.conftest import Cluster

WAKE = "ferry:{p:cpu}:wake"


@pytest.mark.timeout(90)
def test_a_request_wakes_a_pool_scaled_to_zero(repo: Path, tmp_path: Path) -> None:
    grace = ("--no-worker-grace-s", "60")
    cluster = Cluster(repo, tmp_path, gateway_args=grace, broker_args=grace)
    try:
        assert cluster.stop_role("worker") == [0]  # scaled to zero: the worker unregisters as it stops
        r = cluster.redis_client()
        assert r.zcard("ferry:workers") == 0 and not r.exists(WAKE)

        answers: list[object] = []

        def ask() -> None:
            x = tc.InferInput("x", [1, 2], "FP32")
            x.set_data_from_numpy(np.full((1, 2), 3.0, dtype=np.float32))
            try:
                answers.append(cluster.client().infer("versioned", [x], model_version="1", client_timeout=60)
                               .as_numpy("y").tolist())
            except Exception as exc:
                answers.append(exc)

        caller = threading.Thread(target=ask)
        caller.start()
        deadline = time.monotonic() + 20
        while r.llen(WAKE) != 1:
            assert time.monotonic() < deadline, f"no wake-up signal\n{cluster.logs()}"
            assert caller.is_alive(), answers  # the request waits; it is not refused
            time.sleep(0.05)
        assert 0 < r.pttl(WAKE) <= 60_000

        cluster.spawn("worker")  # what the autoscaler does on the signal
        caller.join(60)
        assert answers == [[[4.0, 4.0]]], answers
        deadline = time.monotonic() + 10
        while r.exists(WAKE):
            assert time.monotonic() < deadline, "the worker did not clear the signal"
            time.sleep(0.05)
        cluster.stop_cleanly()
    finally:
        cluster.close()


@pytest.mark.timeout(60)
def test_without_a_worker_requests_fail_after_the_grace(repo: Path, tmp_path: Path) -> None:
    grace = ("--no-worker-grace-s", "1")
    cluster = Cluster(repo, tmp_path, gateway_args=grace, broker_args=grace)
    try:
        cluster.stop_role("worker")
        x = tc.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        started = time.monotonic()
        with pytest.raises(Exception) as err:
            cluster.client().infer("versioned", [x], model_version="1", client_timeout=30)
        assert "UNAVAILABLE" in str(err.value) and "no live worker" in str(err.value), err.value
        assert 0.5 < time.monotonic() - started < 10
    finally:
        cluster.close()
