"""Ferry from Node.js: @grpc/grpc-js + proto-loader on protos/grpc_service.proto, exact outputs.

Needs ``node`` and the client's dependencies: ``npm ci --prefix tests/node``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import Cluster

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        reason="Node client dependencies missing: run `npm ci --prefix tests/node`",
    ),
]


def test_node_client_matches_onnxruntime(cluster: Cluster, repo: Path, tmp_path: Path) -> None:
    assert NODE is not None
    x = np.random.default_rng(11).standard_normal((2, 256)).astype("<f4")
    data = tmp_path / "input.bin"
    data.write_bytes(x.tobytes())
    proc = subprocess.run(
        [NODE, str(NODE_DIR / "client.js"), cluster.url, str(data)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"node client failed ({proc.returncode}): {proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])

    assert out["ready"] is True
    assert out["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "256"]}]
    assert out["id"] == "node-1"
    assert out["shape"] == [2, 10]
    sess = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"INPUT0": x})
    assert base64.b64decode(out["output"]) == want.astype("<f4").tobytes()
    assert out["not_found_code"] == 5  # grpc.status.NOT_FOUND
