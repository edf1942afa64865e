"""A minimal OTLP/gRPC trace receiver that counts what it is sent: for measuring tracing's cost.

    .venv/bin/python benchmarks/otlp_sink.py --port 4317 &
    .venv/bin/python benchmarks/ab.py --before HEAD~1 --set FERRY_OTLP_ENDPOINT=http://127.0.0.1:4317

Prints the spans received every 10 s, per service.  Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections import Counter
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self.lock = threading.Lock()

    def Export(self, request: object, context: object) -> object:
        with self.lock:
            for rs in request.resource_spans:  # type: ignore[attr-defined]
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                self.spans[service] += sum(len(ss.spans) for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=4317)
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    sink = Sink()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(10):
        print(dict(sink.spans), flush=True)
    server.stop(None)
    print("final:", dict(sink.spans), flush=True)


if __name__ == "__main__":
    main()
