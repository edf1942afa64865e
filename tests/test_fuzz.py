"""Fuzzing a live cluster with malformed ModelInfer and ModelStreamInfer requests (tests/fuzz.py).

The default run sends FUZZ_EXAMPLES (1,500) unary requests and 300 on streams; ``scripts/fuzz`` sends
100,000. Every answer must be OK or an expected status; afterwards every process is still up, the
cluster still answers a good request, the module's cluster stops cleanly with no leaked Redis keys,
and no process's memory grew by more than FUZZ_RSS_GROWTH_MB after the first tenth of the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import Cluster
from tests.fuzz import call_stream, call_unary, payload

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
RSS_GROWTH_MB = float(os.environ.get("FUZZ_RSS_GROWTH_MB", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))

codes: Counter[str] = Counter()
rss_mb: dict[str, list[float]] = {}


def _rss(c: Cluster) -> dict[str, float]:
    out = {}
    for i, (role, p) in enumerate(c.procs):
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[f"{role}-{i}"] = int(line.split()[1]) / 1024
    return out


@pytest.fixture(scope="module")
def channel(cluster: Cluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.url, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield ch


@SETTINGS
@given(raw=payload())
def test_malformed_model_infer_requests_get_a_valid_status(cluster: Cluster, channel: grpc.Channel,
                                                           raw: bytes) -> None:
    if sum(codes.values()) == max(EXAMPLES // 10, 1):
        rss_mb["warm"] = list(_rss(cluster).values())
    codes[call_unary(channel, raw)] += 1


@settings(max_examples=max(EXAMPLES // 50, 10), deadline=None, derandomize=True, database=None,
          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(items=st.lists(payload(), min_size=1, max_size=30))
def test_malformed_stream_requests_each_get_an_answer(cluster: Cluster, channel: grpc.Channel,
                                                      items: list[bytes]) -> None:
    codes.update({f"stream {k}": v for k, v in call_stream(channel, items).items()})


def test_after_fuzzing_every_process_is_up_and_memory_is_flat(cluster: Cluster) -> None:
    for role, p in cluster.procs:
        assert p.poll() is None, f"{role} exited with {p.returncode}\n{cluster.logs()}"
    x = tc.InferInput("INPUT0", [1, 256], "FP32")
    x.set_data_from_numpy(np.ones((1, 256), np.float32))
    out = cluster.client().infer("mlp", [x], client_timeout=10).as_numpy("OUTPUT0")
    assert out is not None and out.shape == (1, 10)
    print(f"fuzz: {dict(codes)}")
    assert codes["OK"] + codes["INVALID_ARGUMENT"] + codes["NOT_FOUND"] > 0
    # The fuzzer must reach past the first checks: some requests are well-formed enough to run.
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0, dict(codes)
    if "warm" in rss_mb:
        growth = [now - then for then, now in zip(rss_mb["warm"], _rss(cluster).values(), strict=True)]
        print(f"fuzz: RSS growth since the first tenth, MB: {[round(g, 1) for g in growth]}")
        assert max(growth) < RSS_GROWTH_MB, growth
