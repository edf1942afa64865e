"""Prometheus metrics of every process, scraped over HTTP from a real cluster and checked against
the requests the test sent."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ferry.cluster import free_port
from tests.conftest import Cluster

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {role: free_port() for role in ("gateway", "broker", "worker")}


@pytest.fixture(scope="module")
def metered(repo: Path, tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[Cluster]:
    c = Cluster(repo, tmp_path_factory.mktemp("logs"), workers=0,
                worker_args=(("--metrics-port", str(ports["worker"])),),
                gateway_args=("--metrics-port", str(ports["gateway"])),
                broker_args=("--metrics-port", str(ports["broker"])))
    try:
        yield c
        c.stop_ok()
    finally:
        c.close()


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _infer(client: tc.InferenceServerClient, cols: int) -> None:
    x = tc.InferInput("x", [1, cols], "FP32")
    x.set_data_from_numpy(np.ones((1, cols), dtype=np.float32))
    client.infer("versioned", [x], model_version="1", client_timeout=20)


def test_every_process_counts_what_it_did(metered: Cluster, ports: dict[str, int]) -> None:
    client = metered.client()
    for _ in range(10):
        _infer(client, 2)
    with pytest.raises(InferenceServerException):
        _infer(client, 3)  # wrong shape: INVALID_ARGUMENT at the gateway
    model = {"model": "versioned", "version": "1"}

    gw = scrape(ports["gateway"])
    assert value(gw, "ferry_requests_total", **model, status="OK") == 10
    assert value(gw, "ferry_requests_total", **model, status="INVALID_ARGUMENT") == 1
    assert value(gw, "ferry_request_duration_seconds_count", **model) == 11
    assert value(gw, "ferry_gateway_inflight_requests") == 0
    assert value(gw, "ferry_redis_roundtrip_seconds_count", role="gateway") >= 10

    wk = scrape(ports["worker"])
    executions = value(wk, "ferry_executions_total", **model)
    assert value(wk, "ferry_inferences_total", **model) == 10
    assert 1 <= executions <= 10
    assert value(wk, "ferry_batch_size_count", **model) == executions
    assert value(wk, "ferry_batch_size_sum", **model) == 10
    assert value(wk, "ferry_compute_duration_seconds_count", **model) == executions

    # The broker counts a batch after Redis confirms it, which can come after the answer.
    deadline = time.monotonic() + 10
    while value(br := scrape(ports["broker"]), "ferry_queue_duration_seconds_count", **model) < 10:
        assert time.monotonic() < deadline, br
        time.sleep(0.05)
    assert value(br, "ferry_queue_duration_seconds_count", **model) == 10
    assert value(br, "ferry_batches_dispatched_total", **model, pool="cpu") >= executions
    assert value(br, "ferry_pending_requests", **model) == 0
    assert value(br, "ferry_live_workers", pool="cpu") == 1
    # Exported, and 0 here however busy the CPUs are: only a broker's own worker's batches wait
    # for returning callers, and this broker has none (stream workers).
    assert br[("ferry_broker_return_wait_active", ())] == 0


def test_pool_backlog_and_age_are_sampled(metered: Cluster, ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    while ("ferry_pool_backlog", (("pool", "cpu"),)) not in (br := scrape(ports["broker"])):
        assert time.monotonic() < deadline, "the broker never sampled its pools"
        time.sleep(0.1)
    assert value(br, "ferry_pool_backlog", pool="cpu") >= 0
    assert value(br, "ferry_pool_oldest_batch_age_seconds", pool="cpu") >= 0


def test_health_command_probes_gateway_and_metrics(metered: Cluster, ports: dict[str, int]) -> None:
    # `ferry health` is what the images' HEALTHCHECK and exec probes run.
    import subprocess
    import sys

    def health(*args: str) -> int:
        return subprocess.run([sys.executable, "-m", "ferry.cli", "health", *args], capture_output=True,
                              timeout=30).returncode

    assert health("--grpc", metered.url) == 0
    assert health("--http", f"127.0.0.1:{ports['broker']}") == 0
    assert health("--http", f"127.0.0.1:{ports['worker']}") == 0
