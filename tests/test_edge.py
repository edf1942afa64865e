"""The native edge (gateway/edge) in front of a gateway: clients must not tell the difference.

Every test of test_infer and test_errors runs again here, through the edge: the same
outputs bit for bit, the same statuses and messages (the edge relays what it does not
take, so invalid requests get the gateway's own answer). The tests below check what is
the edge's own: that it does take the simple calls, how it starts, stops and fails.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from ferry.cluster import edge_binary, free_port
from tests.conftest import Cluster, require_edge
from tests.test_errors import *  # noqa: F403  (rerun here, through the edge)
from tests.test_infer import *  # noqa: F403


@pytest.fixture(scope="module")
def cluster(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_edge()
    c = Cluster(repo, tmp_path_factory.mktemp("logs"), gateway_args=("--max-message-bytes", "1048576"), edge=True)
    try:
        yield c
        c.stop_cleanly()
        # The reruns must have gone through the edge's own path, not only its relay.
        taken = re.search(r"stopped: took (\d+) inference calls", _edge_log(c))
        assert taken and int(taken.group(1)) >= 96, c.logs()  # test_concurrent_requests_form_batches alone sends 96
    finally:
        c.close()


@pytest.fixture
def own(repo: Path, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of this test's own, for checks that need its logs or its stop."""
    require_edge()
    c = Cluster(repo, tmp_path, edge=True)
    try:
        yield c
    finally:
        c.close()


def _mlp(rows: int = 1) -> tc.InferInput:
    x = tc.InferInput("INPUT0", [rows, 256], "FP32")
    x.set_data_from_numpy(np.ones((rows, 256), np.float32))
    return x


def _edge_log(c: Cluster) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(c.logdir.glob("edge-*.log")))


def test_the_edge_takes_plain_calls_and_relays_the_rest(own: Cluster) -> None:
    client = own.client()
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: own.client().infer("mlp", [_mlp()]).as_numpy("OUTPUT0"), range(40)))
    assert all(o.shape == (1, 10) for o in outs)
    # A scheduling parameter the gateway reads: relayed, and served all the same.
    assert client.infer("mlp", [_mlp()], priority=1).as_numpy("OUTPUT0").shape == (1, 10)
    with pytest.raises(InferenceServerException) as info:
        client.infer("nonexistent", [_mlp()])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    # Under the gateway's metric names, so that dashboards summing over gateways count them.
    with urllib.request.urlopen(f"http://{own.edge_metrics}/metrics", timeout=5) as resp:
        scraped = resp.read().decode()
    assert 'ferry_requests_total{model="mlp",version="1",status="OK"} 40' in scraped, scraped
    assert 'ferry_request_duration_seconds_count{model="mlp",version="1"} 40' in scraped, scraped
    assert 'ferry_edge_relayed_total{reason="request parameter priority"} 1' in scraped, scraped
    assert "ferry_gateway_inflight_requests 0" in scraped, scraped
    own.stop_cleanly()
    summary = re.search(r"stopped: took (\d+) inference calls(.*)", _edge_log(own))
    assert summary, own.logs()
    assert int(summary.group(1)) == 40, summary.group(0)
    assert "relayed 1 for request parameter priority" in summary.group(2), summary.group(0)


def test_the_edge_holds_calls_across_its_graceful_stop(own: Cluster) -> None:
    """SIGTERM drains: calls in flight are answered, then the edge leaves no key behind."""
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(lambda: own.client().infer("slow", [_slow_input()]).as_numpy("y")) for _ in range(16)]
        time.sleep(0.2)  # not synchronisation: the calls are checked below whatever their timing
        assert own.stop_role("edge") == [0]
        done = [f.result(timeout=30) for f in futures]
    assert all(d.shape == (1,) for d in done)
    own.stop_cleanly()


def _slow_input() -> tc.InferInput:
    x = tc.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.ones(1, np.float32))
    return x


def _edge(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    require_edge()
    return subprocess.run([edge_binary(), *args], capture_output=True, text=True, timeout=timeout)


def test_edge_refuses_what_it_cannot_serve_with_the_fix() -> None:
    bad = _edge("--redis-url", "redis+sentinel://h:26379/mymaster", "--listen", f"127.0.0.1:{free_port()}")
    assert bad.returncode == 2 and "Sentinel" in bad.stderr and "without the edge" in bad.stderr
    taken = free_port()
    gone = _edge("--listen", f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{taken}", "--start-wait", "1s")
    assert gone.returncode == 2 and "did not describe itself" in gone.stderr and "ferry gateway" in gone.stderr
    unknown = _edge("--no-such-flag")
    assert unknown.returncode == 2 and "no-such-flag" in unknown.stderr
    typo = subprocess.run([edge_binary()], capture_output=True, text=True, timeout=20,
                          env={"FERRY_EDGE_LISTN": "127.0.0.1:1"})
    assert typo.returncode == 2 and "FERRY_EDGE_LISTN" in typo.stderr
    negative = _edge("--procs", "-1")
    assert negative.returncode == 2 and "--procs must be >= 0" in negative.stderr
    garbled = subprocess.run([edge_binary()], capture_output=True, text=True, timeout=20,
                             env={"FERRY_EDGE_PROCS": "two"})
    assert garbled.returncode == 2 and "FERRY_EDGE_PROCS" in garbled.stderr


def test_the_edge_settings_are_known_to_every_process() -> None:
    from ferry.errors import ConfigError
    from ferry.settings import check_env

    check_env({"FERRY_EDGE_LISTEN": "0.0.0.0:8001", "FERRY_EDGE_METRICS_LISTEN": ":8012", "FERRY_EDGE_PROCS": "2"})
    with pytest.raises(ConfigError, match="FERRY_EDGE_LISTN"):
        check_env({"FERRY_EDGE_LISTN": "0.0.0.0:8001"})


def test_with_tokens_the_edge_relays_every_call_and_bypasses_no_check(repo: Path, tmp_path: Path) -> None:
    require_edge()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [
        {"name": "t", "sha256": hashlib.sha256(b"tok-edge-0123456789").hexdigest(), "models": ["mlp"]}]}))
    c = Cluster(repo, tmp_path, edge=True, headers={"authorization": "Bearer tok-edge-0123456789"},
                gateway_args=("--auth-tokens-file", str(tokens)))
    try:
        client = c.client()
        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [_mlp()])
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.infer("mlp", [_mlp()], headers=c.headers).as_numpy("OUTPUT0").shape == (1, 10)
        with pytest.raises(InferenceServerException) as info:
            client.infer("identity", [_mlp()], headers=c.headers)
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        c.stop_cleanly()
        log = _edge_log(c)
        assert "relays every call (the gateway checks tokens)" in log and "took 0 inference calls" in log, log
    finally:
        c.close()


def test_a_full_queue_is_refused_whichever_way_the_edge_queued(own: Cluster) -> None:
    """max_queue_size through the edge. Where the edge last saw a queue at most half full it queues by
    transaction and checks the count after: when another gateway filled the queue behind its back, the
    call is refused all the same and taken out of the queue again (the count must not drift). Where it
    saw the queue fuller, the ENQUEUE script refuses before queueing."""
    from tests.test_scheduling import Calls, _all_read, _queued, _until, _x, held

    queued_key = "ferry:{m:paced}:v1:queued"
    edge, gateway = own.client(), tc.InferenceServerClient(own.gateway_url)
    calls = Calls()
    with held(own, calls) as r:  # the fillers go through the edge, which so learns paced's queue
        edge.async_infer("paced", _x(), calls.cb("q0"))
        _until(lambda: _queued(r, "paced") == 1 and _all_read(r, "paced"), "q0 queued")
        for i in range(1, 4):  # another gateway fills the queue; the edge last saw one request in it
            gateway.async_infer("paced", _x(), calls.cb(f"q{i}"))
        _until(lambda: _queued(r, "paced") == 4 and _all_read(r, "paced"), "the queue full")
        transactions = _transactions(r)
        for way in ("by transaction", "by the script"):
            with pytest.raises(InferenceServerException) as info:
                edge.infer("paced", _x(), client_timeout=5)
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", way
            assert "4 requests wait, max_queue_size is 4" in str(info.value.message()), way
            _until(lambda: _queued(r, "paced") == 4 and _all_read(r, "paced"), f"refused {way}: the count back at 4")
            if way == "by transaction":
                assert _transactions(r) == transactions + 1
                transactions += 1
        assert _transactions(r) == transactions  # the script, no transaction
    calls.wait(6)
    assert calls.errors == {}  # everything admitted was answered
    _until(lambda: r.exists(queued_key) == 0, "the queue count deleted at 0")
    own.stop_cleanly()


def _transactions(r: redis.Redis) -> int:
    """EXEC calls so far: the edge's transactions (no Python process sends MULTI)."""
    return int(r.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))
