"""Several gateway processes on one port (SO_REUSEPORT), and the refusal to share it by accident."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.conftest import ROOT, Cluster


@pytest.fixture
def shared(repo: Path, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(repo, tmp_path, gateway_args=("--reuse-port", "--log-level", "DEBUG"))
    try:
        c.spawn("gateway", "--grpc-port", str(c.port), "--host", "127.0.0.1", "--reuse-port", "--log-level", "DEBUG")
        yield c
        c.stop_cleanly()
    finally:
        c.close()


def test_two_gateways_share_the_port_and_both_serve(shared: Cluster) -> None:
    x = tc.InferInput("INPUT0", [1, 256], "FP32")
    x.set_data_from_numpy(np.ones((1, 256), np.float32))
    # The second gateway may still be starting: the kernel only hands connections to a listening socket,
    # so every call succeeds either way. New connections until both have answered some.
    answered: dict[str, int] = {}
    for _ in range(400):
        client = tc.InferenceServerClient(shared.url)
        out = client.infer("mlp", [x], client_timeout=10).as_numpy("OUTPUT0")
        client.close()
        assert out is not None and out.shape == (1, 10)
        answered = {p.name: p.read_text(errors="replace").count("request answered")
                    for p in sorted(shared.logdir.glob("gateway-*.log"))}
        if len(answered) == 2 and all(answered.values()):
            break
    assert len(answered) == 2 and all(answered.values()), f"{answered}\n{shared.logs()}"


def test_a_second_gateway_without_reuse_port_fails_with_a_clear_error(shared: Cluster) -> None:
    proc = subprocess.run([sys.executable, "-m", "ferry.cli", "gateway", "--grpc-port", str(shared.port),
                           "--host", "127.0.0.1", "--metrics-port", "-1"],
                          env=shared.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{shared.port}" in proc.stderr and "--reuse-port" in proc.stderr, proc.stderr
