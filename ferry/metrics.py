"""Every Prometheus metric Ferry exports, defined in one place (docs/observability.md lists them).

Each process serves the metrics of its role over HTTP (``--metrics-port``;
``/metrics``, Prometheus text format) from a thread of prometheus_client, so a
scrape never waits for the event loop.  Names follow Prometheus conventions:
``ferry_`` prefix, base units (seconds), ``_total`` for counters.  The
``triton`` comment of each names the Triton metric a dashboard migrating from
Triton would have used.

Label values are bounded: models and versions come from the repository,
pools from the configuration, statuses from the gRPC code set.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("ferry.metrics")


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Counter(Collector):
    """A labelled counter that costs a dict lookup and an add on the request path.

    prometheus_client's own takes a lock per call (about 2.5 us with ``labels``); these
    are only ever changed from one thread, the event loop's, and read by the scrape
    thread, for which the GIL is enough (a scrape may see a sum one event ahead of its
    count, which Prometheus tolerates).
    """

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        REGISTRY.register(self)

    def labels(self, *values: str) -> _CounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class Histogram(Collector):
    """A labelled histogram: a bisect and two adds per observation (see Counter)."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        REGISTRY.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HistogramChild(self.bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        yield family

MODEL = ("model", "version")
# From 0.5 ms to 60 s: a batch-1 call on a CPU through a whole deadline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# --- gateway -----------------------------------------------------------------------------------

REQUESTS = Counter(
    "ferry_requests", "Inference requests answered by the gateway, by final gRPC status "
    "(triton: nv_inference_request_success / nv_inference_request_failure)", [*MODEL, "status"])
REQUEST_DURATION = Histogram(
    "ferry_request_duration_seconds", "From the gateway receiving a request to its answer "
    "(triton: nv_inference_request_duration_us)", MODEL, buckets=LATENCY_BUCKETS)
INFLIGHT = Gauge("ferry_gateway_inflight_requests", "Requests this gateway holds, waiting for their answer")
DROPPED_REPLIES = Counter(
    "ferry_dropped_replies", "Replies that found no waiting call: a duplicate (a request that ran twice) "
    "or an answer after its call ended (deadline, cancel)")
RESENT = Counter("ferry_resent_requests", "Requests queued again after the gateway's Redis connection was replaced")

# --- broker ------------------------------------------------------------------------------------

QUEUE_DURATION = Histogram(
    "ferry_queue_duration_seconds", "From the gateway queueing a request to the broker handing its batch "
    "to a pool (triton: nv_inference_queue_duration_us)", MODEL, buckets=LATENCY_BUCKETS)
PENDING = Gauge(
    "ferry_pending_requests", "Requests a broker holds, not yet batched "
    "(triton: nv_inference_pending_request_count)", MODEL)
BATCHES = Counter("ferry_batches_dispatched", "Batches a broker handed to a pool", [*MODEL, "pool"])
REJECTED = Counter(
    "ferry_requests_rejected", "Requests a broker answered without running them, by status "
    "(DEADLINE_EXCEEDED: could not make the deadline; UNAVAILABLE: no worker)", [*MODEL, "status"])
BACKLOG = Gauge("ferry_pool_backlog", "Batch entries on a pool's stream (waiting or running): what KEDA scales on",
                ["pool"])
OLDEST_AGE = Gauge("ferry_pool_oldest_batch_age_seconds", "Age of the oldest batch entry on a pool's stream",
                   ["pool"])
LIVE_WORKERS = Gauge("ferry_live_workers", "Workers with a live heartbeat, by pool", ["pool"])
RETURN_WAIT_ACTIVE = Gauge("ferry_broker_return_wait_active", "1 while this broker holds its own worker's small "
                           "batches for the callers just answered (return_wait_us: its CPUs are saturated), else 0")

# --- worker ------------------------------------------------------------------------------------

COMPUTE_DURATION = Histogram(
    "ferry_compute_duration_seconds", "Model execution time per batch, input decode and output encode "
    "included (triton: nv_inference_compute_infer_duration_us, per batch)", MODEL, buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("ferry_batch_size", "Rows per model execution (triton: batch statistics)", MODEL,
                       buckets=BATCH_BUCKETS)
INFERENCES = Counter("ferry_inferences", "Rows run (triton: nv_inference_count)", MODEL)
EXECUTIONS = Counter("ferry_executions", "Model executions (triton: nv_inference_exec_count)", MODEL)
RECOVERED = Counter(
    "ferry_recovered_batches", "Batches a worker took over from a dead one, by what it did with them "
    "(rerun, split, dead_letter) or that came back from Redis (forgotten)", ["pool", "outcome"])

# --- every process -----------------------------------------------------------------------------

REDIS_RTT = Histogram("ferry_redis_roundtrip_seconds", "Time of a data-path Redis pipeline, by process role",
                      ["role"], buckets=LATENCY_BUCKETS)
TAKEN_OVER = Counter("ferry_taken_over_entries", "Stream entries a process claimed from dead peers of its role",
                     ["role"])


def serve(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on ``port`` (0 picks a free one; -1 serves nothing); returns the port or -1."""
    if port < 0:
        return -1
    server, _ = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
