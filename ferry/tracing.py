"""OpenTelemetry tracing across gateway, broker and worker; off unless ``--otlp-endpoint`` is set.

The W3C trace context travels with each request: from the client's gRPC
metadata (``traceparent``; a new root trace when absent) to the gateway's
server span, inside the Redis messages to the broker (request groups and
batches carry one ``traceparent`` per request, broker.messages), and to the
worker.  Spans:

* ``ModelInfer`` (gateway, SERVER): from receiving the request to answering it;
* ``queue`` (broker): from the gateway queueing the request to its batch leaving;
* ``batch`` (broker): forming and routing one batch; a child of its first
  member's span, linked to every other member's;
* ``compute`` (worker): running the batch; a child of the ``batch`` span,
  linked to every member's request span.

Spans go to an OTLP/gRPC collector in batches (BatchSpanProcessor), sampled
by ``--trace-sample-ratio`` at the root and following the parent's decision
after that.  When tracing is off, this module imports no OpenTelemetry and
the request path pays one attribute check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from ferry.errors import ConfigError

log = logging.getLogger("ferry.tracing")

TRACEPARENT = "traceparent"


class Tracing:
    """One per process; ``enabled`` False means every method below is never called."""

    def __init__(self, service: str, endpoint: str, sample_ratio: float, instance: str) -> None:
        self.enabled = bool(endpoint)
        self._provider: Any = None
        self.tracer: Any = None
        if not self.enabled:
            return
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError:
            raise ConfigError("--otlp-endpoint needs OpenTelemetry: pip install 'ferry-serve[tracing]'") from None
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": service, "service.instance.id": instance})
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        self.tracer = self._provider.get_tracer("ferry")
        self._propagator = TraceContextTextMapPropagator()
        log.info("tracing to %s (sample ratio %g)", endpoint, sample_ratio)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes what is still queued

    # --- context <-> traceparent -------------------------------------------------------------

    def context_of(self, traceparent: str) -> Any:
        """The OpenTelemetry context a ``traceparent`` header names (an empty one for '')."""
        return self._propagator.extract({TRACEPARENT: traceparent} if traceparent else {})

    def traceparent(self, span: Any) -> str:
        """``span``'s context as a traceparent header ('' when it is not sampled)."""
        from opentelemetry import trace

        if not span.get_span_context().trace_flags.sampled:
            return ""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get(TRACEPARENT, "")

    def links(self, traceparents: Iterable[str]) -> list[Any]:
        from opentelemetry import trace

        out = []
        for tp in traceparents:
            if tp:
                ctx = trace.get_current_span(self.context_of(tp)).get_span_context()
                if ctx.is_valid:
                    out.append(trace.Link(ctx))
        return out

    # --- the spans ---------------------------------------------------------------------------

    def server_span(self, metadata: Sequence[tuple[str, Any]] | None, model: str, version: int) -> Any:
        from opentelemetry.trace import SpanKind

        incoming = next((str(v) for k, v in metadata or () if k == TRACEPARENT), "")
        return self.tracer.start_span("ModelInfer", context=self.context_of(incoming), kind=SpanKind.SERVER,
                                      attributes={"ferry.model": model, "ferry.version": version})

    def broker_spans(self, members: Sequence[tuple[str, int]], now_ns: int, attributes: dict[str, Any]) -> str:
        """``queue`` spans for the traced members (traceparent, enqueue ns), then the ``batch`` span;
        returns the batch span's traceparent ('' when no member is traced)."""
        traced = [(tp, t) for tp, t in members if tp]
        if not traced:
            return ""
        for tp, enqueued_ns in traced:
            span = self.tracer.start_span("queue", context=self.context_of(tp), start_time=enqueued_ns)
            span.end(end_time=now_ns)
        first = traced[0][0]
        batch = self.tracer.start_span("batch", context=self.context_of(first), start_time=now_ns,
                                       links=self.links(tp for tp, _ in traced[1:]), attributes=attributes)
        batch.end()
        return self.traceparent(batch)

    def compute_span(self, batch_tp: str, member_tps: Sequence[str], start_ns: int, end_ns: int,
                     attributes: dict[str, Any]) -> None:
        if not batch_tp:
            return
        span = self.tracer.start_span("compute", context=self.context_of(batch_tp), start_time=start_ns,
                                      links=self.links(member_tps), attributes=attributes)
        span.end(end_time=end_ns)


OFF = Tracing("", "", 1.0, "")
