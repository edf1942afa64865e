"""One request, one connected trace across the gateway, broker and worker processes.

The test process runs a real OTLP/gRPC receiver (the collector's TraceService, from
opentelemetry-proto); the three Ferry processes export to it with the OpenTelemetry SDK, as
they would to an OpenTelemetry Collector.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import Cluster


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with the service that sent it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request: object, context: object) -> object:
        with self.lock:
            for rs in request.resource_spans:  # type: ignore[attr-defined]
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    self.spans += [(service, span) for span in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    recv = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(recv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield recv, port
    server.stop(None)


@pytest.fixture(scope="module")
def traced(repo: Path, tmp_path_factory: pytest.TempPathFactory,
           receiver: tuple[Receiver, int]) -> Iterator[Cluster]:
    flag = ("--otlp-endpoint", f"http://127.0.0.1:{receiver[1]}")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # the processes export within 0.1 s, not the SDK's 5 s
    try:
        c = Cluster(repo, tmp_path_factory.mktemp("logs"), workers=0, worker_args=(flag,), gateway_args=flag,
                    broker_args=flag)
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    try:
        yield c
        c.stop_ok()
    finally:
        c.close()


def test_one_request_is_one_trace_across_three_processes(traced: Cluster, receiver: tuple[Receiver, int]) -> None:
    recv, _ = receiver
    trace_id, client_span = secrets.token_bytes(16), secrets.token_bytes(8)
    x = tc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    traced.client().infer("versioned", [x], model_version="1", client_timeout=20,
                          headers={"traceparent": f"00-{trace_id.hex()}-{client_span.hex()}-01"})

    deadline = time.monotonic() + 15
    while {s.name for _, s in recv.of_trace(trace_id)} != {"ModelInfer", "queue", "batch", "compute"}:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, [(svc, s.name) for svc, s in recv.of_trace(trace_id)]  # type: ignore[attr-defined]
        time.sleep(0.05)
    spans = {s.name: (svc, s) for svc, s in recv.of_trace(trace_id)}  # type: ignore[attr-defined]
    (gw_svc, server), (q_svc, queue) = spans["ModelInfer"], spans["queue"]
    (b_svc, batch), (w_svc, compute) = spans["batch"], spans["compute"]
    assert (gw_svc, q_svc, b_svc, w_svc) == ("ferry-gateway", "ferry-broker", "ferry-broker", "ferry-worker")
    assert server.parent_span_id == client_span  # type: ignore[attr-defined]
    assert queue.parent_span_id == server.span_id  # type: ignore[attr-defined]
    assert batch.parent_span_id == server.span_id  # type: ignore[attr-defined]
    assert compute.parent_span_id == batch.span_id  # type: ignore[attr-defined]
    assert [link.span_id for link in compute.links] == [server.span_id]  # type: ignore[attr-defined]
    # Time runs forward across the processes: queueing starts inside the call, computing after it.
    assert server.start_time_unix_nano <= queue.start_time_unix_nano <= compute.start_time_unix_nano  # type: ignore[attr-defined]
    assert compute.end_time_unix_nano <= server.end_time_unix_nano  # type: ignore[attr-defined]


def test_untraced_clients_get_a_root_trace(traced: Cluster, receiver: tuple[Receiver, int]) -> None:
    recv, _ = receiver
    before = {s.trace_id for _, s in recv.spans if s.name == "ModelInfer"}  # type: ignore[attr-defined]
    x = tc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    traced.client().infer("versioned", [x], model_version="1", client_timeout=20)
    deadline = time.monotonic() + 15
    while True:
        new = {s.trace_id for _, s in recv.spans if s.name == "ModelInfer"} - before  # type: ignore[attr-defined]
        if new and {s.name for _, s in recv.of_trace(next(iter(new)))} >= {"ModelInfer", "compute"}:  # type: ignore[attr-defined]
            break
        assert time.monotonic() < deadline, "no new trace"
        time.sleep(0.05)
    root = next(s for _, s in recv.of_trace(next(iter(new))) if s.name == "ModelInfer")  # type: ignore[attr-defined]
    assert root.parent_span_id == b""  # type: ignore[attr-defined]
