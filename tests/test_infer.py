"""End to end through a real cluster: every RPC via unmodified tritonclient, exact outputs."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tc

from tests.conftest import Cluster
from tests.models import IDENTITY_TYPES


def _ort(model_file: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _mlp_input(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)


def _infer_mlp(client: tc.InferenceServerClient, x: np.ndarray, **kw: object) -> tc.InferResult:
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("mlp", [inp], **kw)


def test_health_and_metadata_rpcs(cluster: Cluster) -> None:
    c = cluster.client()
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("mlp")
    assert c.is_model_ready("versioned", "2")
    meta = c.get_server_metadata(as_json=True)
    assert meta["name"] == "ferry" and "model_configuration" in meta["extensions"]
    md = c.get_model_metadata("mlp", as_json=True)
    assert md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "256"]}]
    assert md["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert c.get_model_metadata("versioned", as_json=True)["versions"] == ["1", "2"]
    cfg = c.get_model_config("mlp", as_json=True)["config"]
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == ["256"]
    # Inputs the config leaves out are filled from the ONNX graph.
    ident = c.get_model_config("identity", as_json=True)["config"]
    assert {i["name"] for i in ident["input"]} == {f"IN_{t}" for t in IDENTITY_TYPES}
    index = c.get_model_repository_index(as_json=True)["models"]
    states = {(m["name"], m["version"], m["state"]) for m in index}
    assert states >= {("mlp", "1", "READY"), ("versioned", "2", "READY")}


def test_outputs_match_onnxruntime_bit_for_bit(cluster: Cluster, repo: Path) -> None:
    c = cluster.client()
    for rows, seed in ((1, 1), (5, 2), (32, 3)):
        x = _mlp_input(rows, seed)
        res = _infer_mlp(c, x, request_id=f"req-{rows}")
        assert res.get_response().id == f"req-{rows}"
        got = res.as_numpy("OUTPUT0")
        (want,) = _ort(repo / "mlp" / "1" / "model.onnx", {"INPUT0": x})
        assert got.dtype == np.float32 and got.shape == (rows, 10)
        assert got.tobytes() == want.tobytes()


def test_every_datatype_round_trips(cluster: Cluster) -> None:
    c = cluster.client()
    rng = np.random.default_rng(7)
    inputs, expected = [], {}
    for name, (_, np_type) in IDENTITY_TYPES.items():
        if name == "BYTES":
            arr = np.array([[b"", b"a", "ü".encode(), b"\x00\x01" * 40] for _ in range(2)], dtype=np.object_)
        elif name == "BOOL":
            arr = rng.integers(0, 2, (2, 4)).astype(np.bool_)
        elif np_type in (np.float16, np.float32, np.float64):
            arr = rng.standard_normal((2, 4)).astype(np_type)
        else:
            info = np.iinfo(np_type)
            arr = rng.integers(info.min, info.max, (2, 4), dtype=np_type, endpoint=True)
        inp = tc.InferInput(f"IN_{name}", [2, 4], name)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
        expected[f"OUT_{name}"] = arr
    res = c.infer("identity", inputs)
    for out, want in expected.items():
        got = res.as_numpy(out)
        assert got.shape == want.shape, out
        assert got.tolist() == want.tolist(), out


def test_requested_output_subset_and_versions(cluster: Cluster) -> None:
    c = cluster.client()
    a = tc.InferInput("IN_INT32", [1, 4], "INT32")
    a.set_data_from_numpy(np.arange(4, dtype=np.int32).reshape(1, 4))
    others = []
    for name in IDENTITY_TYPES:
        if name != "INT32":
            i = tc.InferInput(f"IN_{name}", [1, 4], name)
            if name == "BYTES":
                i.set_data_from_numpy(np.array([[b"x"] * 4], dtype=object))
            else:
                i.set_data_from_numpy(np.zeros((1, 4), dtype=IDENTITY_TYPES[name][1]))
            others.append(i)
    res = c.infer("identity", [a, *others], outputs=[tc.InferRequestedOutput("OUT_INT32")])
    assert [o.name for o in res.get_response().outputs] == ["OUT_INT32"]
    x = tc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
    assert c.infer("versioned", [x], model_version="1").as_numpy("y").tolist() == [[1.0, 1.0]]
    assert c.infer("versioned", [x], model_version="2").as_numpy("y").tolist() == [[2.0, 2.0]]
    latest = c.infer("versioned", [x])
    assert latest.get_response().model_version == "2" and latest.as_numpy("y").tolist() == [[2.0, 2.0]]


def test_unbatched_model(cluster: Cluster) -> None:
    x = tc.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(np.array([1, -2, 3], dtype=np.float32))
    assert cluster.client().infer("unbatched", [x]).as_numpy("y").tolist() == [-1, 2, -3]


def test_stream_infer(cluster: Cluster, repo: Path) -> None:
    c = cluster.client()
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        xs = {f"s{i}": _mlp_input(1 + i % 3, 100 + i) for i in range(10)}
        for rid, x in xs.items():
            inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            c.async_stream_infer("mlp", [inp], request_id=rid)
        bad = tc.InferInput("INPUT0", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        c.async_stream_infer("mlp", [bad], request_id="bad")
        seen, errors = {}, []
        for _ in range(len(xs) + 1):
            result, error = results.get(timeout=20)
            if error is not None:
                errors.append(str(error))
            else:
                seen[result.get_response().id] = result.as_numpy("OUTPUT0")
    finally:
        c.stop_stream()
    assert set(seen) == set(xs)
    for rid, x in xs.items():
        (want,) = _ort(repo / "mlp" / "1" / "model.onnx", {"INPUT0": x})
        assert seen[rid].tobytes() == want.tobytes()
    assert len(errors) == 1 and "INPUT0" in errors[0]


def test_concurrent_requests_form_batches(cluster: Cluster, repo: Path) -> None:
    c = cluster.client()
    before = c.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    xs = [_mlp_input(1, 1000 + i) for i in range(96)]
    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda x: _infer_mlp(cluster.client(), x).as_numpy("OUTPUT0"), xs))
    sess = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for x, got in zip(xs, outs, strict=True):
        assert got.tobytes() == sess.run(None, {"INPUT0": x})[0].tobytes()
    # Each worker flushes its statistics to Redis on its own short timer, so wait on this
    # test's own request count: inference_count alone can reach the mark early when earlier
    # multi-row requests padded it while one worker's share of these requests is unflushed.
    def success(s: dict[str, Any]) -> int:
        return int(s.get("inference_stats", {}).get("success", {}).get("count", 0))

    want = success(before) + 96
    stats = before
    deadline = time.monotonic() + 10
    while success(stats) < want:
        assert time.monotonic() < deadline, f"success count stayed at {success(stats)} (want {want})"
        time.sleep(0.05)
        stats = c.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= int(before.get("inference_count", 0)) + 96
    sizes = {int(b["batch_size"]) for b in stats["batch_stats"]}
    assert max(sizes) > 1, f"no batch bigger than 1 formed: {sorted(sizes)}"
    assert int(stats["execution_count"]) < int(stats["inference_count"])
    inf = stats["inference_stats"]
    assert int(inf["compute_infer"]["ns"]) > 0
