"""Bad input gets a clear status naming what was wrong; nothing crashes or hangs."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpbg
from tritonclient.utils import InferenceServerException

from tests.conftest import Cluster


def _status(fn: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return str(info.value.status()), str(info.value.message())


def _mlp(shape: list[int], datatype: str = "FP32", data: np.ndarray | None = None) -> tc.InferInput:
    inp = tc.InferInput("INPUT0", shape, datatype)
    if data is not None:
        inp.set_data_from_numpy(data)
    return inp


def _stub(cluster: Cluster) -> tpbg.GRPCInferenceServiceStub:
    return tpbg.GRPCInferenceServiceStub(grpc.insecure_channel(cluster.url))


def _raw_request(**kw: object) -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name="mlp", **kw)
    return req


def test_unknown_model_and_version(cluster: Cluster) -> None:
    c = cluster.client()
    x = _mlp([1, 256], data=np.zeros((1, 256), np.float32))
    code, msg = _status(lambda: c.infer("nope", [x]))
    assert code == "StatusCode.NOT_FOUND" and "'nope'" in msg
    code, msg = _status(lambda: c.infer("mlp", [x], model_version="7"))
    assert code == "StatusCode.NOT_FOUND" and "version 7" in msg
    code, msg = _status(lambda: c.get_model_metadata("nope"))
    assert code == "StatusCode.NOT_FOUND"
    code, _ = _status(lambda: c.is_model_ready("versioned", "3"))
    assert code == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: _mlp([1, 256], "FP64", np.zeros((1, 256), np.float64)), "datatype FP64"),
        (lambda: _mlp([1, 255], data=np.zeros((1, 255), np.float32)), "shape [1, 255]"),
        (lambda: _mlp([33, 256], data=np.zeros((33, 256), np.float32)), "max_batch_size 32"),
        (lambda: _mlp([256], data=np.zeros((256,), np.float32)), "shape [256]"),
    ],
    ids=["datatype", "dims", "batch-too-big", "rank"],
)
def test_invalid_inputs_name_the_input(cluster: Cluster, make: Callable[[], tc.InferInput], needle: str) -> None:
    code, msg = _status(lambda: cluster.client().infer("mlp", [make()]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in msg and needle in msg, msg


def test_raw_byte_length_element_count_missing_and_unexpected(cluster: Cluster) -> None:
    stub = _stub(cluster)

    def call(req: tpb.ModelInferRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=10)
        return info.value

    req = _raw_request()
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
    req.raw_input_contents.append(b"\0" * 1023)
    err = call(req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1023 bytes" in err.details() and "INPUT0" in err.details()

    req = _raw_request()
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
    t.contents.fp32_contents.extend([0.0] * 255)
    err = call(req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "255 elements" in err.details()

    req = _raw_request()
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
    t.contents.int_contents.extend([0] * 256)
    err = call(req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "fp32_contents" in err.details()

    err = call(_raw_request())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing input" in err.details() and "INPUT0" in err.details()

    req = _raw_request()
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256]).contents.fp32_contents.extend([0.0] * 256)
    req.inputs.add(name="EXTRA", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(0.0)
    err = call(req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'EXTRA'" in err.details()

    req = _raw_request()
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256]).contents.fp32_contents.extend([0.0] * 256)
    req.outputs.add(name="NOPE")
    err = call(req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'NOPE'" in err.details()


def test_typed_contents_are_served(cluster: Cluster) -> None:
    """Typed contents (not raw) take the same path and give the same answer."""
    x = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    req = _raw_request(id="typed")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 256]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    resp = _stub(cluster).ModelInfer(req, timeout=10)
    typed = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    raw = cluster.client().infer("mlp", [_mlp([2, 256], data=x)]).as_numpy("OUTPUT0")
    assert resp.id == "typed" and typed.tobytes() == raw.tobytes()


def test_message_over_limit_is_resource_exhausted(cluster: Cluster) -> None:
    # The test cluster's gateway accepts at most 1 MiB per message.
    x = np.zeros((32, 256), np.float32)
    big = tc.InferInput("INPUT0", [32, 256], "FP32")
    big.set_data_from_numpy(x)
    req = _raw_request()
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
    req.raw_input_contents.append(b"\0" * (2 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as info:
        _stub(cluster).ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_model_execution_error_fails_only_its_requests(cluster: Cluster) -> None:
    """'fragile' fails at run time when n is not a multiple of 3; good requests in the same moment succeed."""
    from concurrent.futures import ThreadPoolExecutor

    def call(n: int) -> tuple[str, object]:
        x = tc.InferInput("x", [1, n], "FP32")
        x.set_data_from_numpy(np.arange(n, dtype=np.float32).reshape(1, n))
        try:
            return "ok", cluster.client().infer("fragile", [x]).as_numpy("y")
        except InferenceServerException as exc:
            return str(exc.status()), exc.message()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, [6, 4] * 16))
    for n, (status, value) in zip([6, 4] * 16, results, strict=True):
        if n == 6:
            assert status == "ok" and value.shape == (1, 3, 2)  # type: ignore[union-attr]
        else:
            assert status == "StatusCode.INTERNAL" and "model execution failed" in str(value)


def test_bytes_input_must_be_utf8_for_onnx(cluster: Cluster) -> None:
    inputs = []
    from tests.models import IDENTITY_TYPES

    for name, (_, np_type) in IDENTITY_TYPES.items():
        arr = np.array([[b"\xff"] * 4], dtype=object) if name == "BYTES" else np.zeros((1, 4), np_type)
        i = tc.InferInput(f"IN_{name}", [1, 4], name)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    code, msg = _status(lambda: cluster.client().infer("identity", inputs))
    assert code == "StatusCode.INVALID_ARGUMENT" and "IN_BYTES" in msg and "UTF-8" in msg


def test_deadline_is_honoured(cluster: Cluster) -> None:
    """A call whose deadline cannot be met ends with DEADLINE_EXCEEDED, promptly."""
    x = tc.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.ones(1, np.float32))
    t0 = time.monotonic()
    code, _ = _status(lambda: cluster.client().infer("slow", [x], client_timeout=0.002))
    assert code == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 5


def test_failures_are_counted_in_statistics(cluster: Cluster) -> None:
    c = cluster.client()

    def fails() -> int:
        stats = c.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
        return int(stats.get("inference_stats", {}).get("fail", {}).get("count", 0))

    before = fails()
    for _ in range(3):
        _status(lambda: c.infer("mlp", [_mlp([1, 255], data=np.zeros((1, 255), np.float32))]))
    deadline = time.monotonic() + 10
    while fails() < before + 3:
        assert time.monotonic() < deadline, f"fail count stayed at {fails()} (was {before})"
        time.sleep(0.05)
