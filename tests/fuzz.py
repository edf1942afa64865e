"""Malformed inference requests (hypothesis strategies) and a driver that fires them at a live gateway.

Requests are built with tritonclient's own protobuf classes (the test process never imports Ferry's)
and sent as raw bytes, so anything from a well-formed request with absurd values to a truncated or
bit-flipped message reaches the gateway. Every answer must be OK or a status from ``EXPECTED``: an
INTERNAL or UNKNOWN status, a hang, or a process that dies is a finding.

    tests/test_fuzz.py                      a short run in the default tests
    scripts/fuzz [COUNT]                    the long run: 100,000 requests (FUZZ_EXAMPLES)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED}
METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

NAMES = st.sampled_from(["mlp", "identity", "versioned", "", "MLP", "../mlp", "mlp/../identity", "/etc/passwd",
                         "mlp\x00", "é" * 40, "x" * 5000])
TENSORS = st.sampled_from(["INPUT0", "IN_FP32", "IN_BYTES", "IN_INT64", "", "OUTPUT0", "x" * 300])
DATATYPES = st.sampled_from(["FP32", "FP16", "BF16", "FP64", "INT8", "INT64", "UINT64", "BOOL", "BYTES", "",
                             "fp32", "FP128", "STRING"])
DIMS = st.one_of(st.integers(-2, 300), st.sampled_from([0, 1 << 31, (1 << 40) + 1, (1 << 62), (1 << 63) - 1,
                                                        -(1 << 63), 255, 256, 257]))
SHAPES = st.lists(DIMS, max_size=6)


@st.composite
def infer_request(draw: Callable[..., Any]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=draw(NAMES), model_version=draw(st.sampled_from(["", "1", "2", "0", "-1",
                                                                                          "abc", "99999999999"])))
    req.id = draw(st.text(max_size=20))
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(TENSORS), datatype=draw(DATATYPES), shape=draw(SHAPES))
        which = draw(st.sampled_from(["raw", "raw", "fp32", "int64", "bytes", "none"]))
        if which == "raw":
            req.raw_input_contents.append(draw(st.binary(max_size=2048)))
        elif which == "fp32":
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=300)))
        elif which == "int64":
            t.contents.int64_contents.extend(draw(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=50)))
        elif which == "bytes":
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=8)))
        if draw(st.booleans()):
            t.parameters["binary_data_size"].int64_param = draw(st.integers(-10, 5000))
    if draw(st.booleans()):
        req.raw_input_contents.append(draw(st.binary(max_size=64)))  # more raw buffers than inputs
    for _ in range(draw(st.integers(0, 2))):
        req.outputs.add(name=draw(TENSORS))
    for key in draw(st.lists(st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output", ""]),
                             max_size=3)):
        p = req.parameters[key]
        kind = draw(st.sampled_from(["int64", "uint64", "bool", "string", "double"]))
        if kind == "int64":
            p.int64_param = draw(st.integers(-(1 << 63), (1 << 63) - 1))
        elif kind == "uint64":
            p.uint64_param = draw(st.integers(0, (1 << 64) - 1))
        elif kind == "bool":
            p.bool_param = draw(st.booleans())
        elif kind == "string":
            p.string_param = draw(st.text(max_size=10))
        else:
            p.double_param = draw(st.floats())
    return req


@st.composite
def payload(draw: Callable[..., Any]) -> bytes:
    """Bytes on the wire: a drawn request as is, truncated, bit-flipped, or no protobuf at all."""
    kind = draw(st.sampled_from(["request", "request", "request", "truncated", "flipped", "garbage", "valid"]))
    if kind == "garbage":
        return bytes(draw(st.binary(max_size=512)))
    if kind == "valid":  # a well-formed request, so that the fuzzer also exercises the whole path
        rows = draw(st.integers(1, 4))
        req = pb.ModelInferRequest(model_name="mlp", id=draw(st.text(max_size=8)))
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 256])
        req.raw_input_contents.append(draw(st.binary(min_size=rows * 1024, max_size=rows * 1024)))
        return bytes(req.SerializeToString())
    data = draw(infer_request()).SerializeToString()
    if kind == "truncated" and data:
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flipped" and data:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    return bytes(data)


def call_unary(channel: grpc.Channel, raw: bytes, timeout_s: float = 30) -> str:
    """One ModelInfer call with ``raw`` as the message: its status name (AssertionError if not EXPECTED)."""
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    try:
        call(raw, timeout=timeout_s)
        return "OK"
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code not in EXPECTED:
            raise AssertionError(f"{code}: {exc.details()} for {raw[:300]!r}") from None  # type: ignore[attr-defined]
        return str(code.name)


def call_stream(channel: grpc.Channel, items: list[bytes], timeout_s: float = 60) -> Counter[str]:
    """All of ``items`` on one ModelStreamInfer stream: one answer each, and the stream ends OK."""
    call = channel.stream_stream(STREAM, request_serializer=None,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)
    codes: Counter[str] = Counter()
    for resp in call(iter(items), timeout=timeout_s):
        codes["error" if resp.error_message else "OK"] += 1
    assert sum(codes.values()) == len(items), f"{len(items)} requests, {sum(codes.values())} answers"
    return codes
