"""Layouts of the messages that cross Redis.

Requests travel in *groups*: whatever one gateway received for one model
version, priority level and shape key between two of its Redis round trips
(at most max_batch_size rows), so Redis and the broker pay per group, not
per request.  Times that cross processes are wall-clock nanoseconds since
the epoch (hosts are expected to run NTP; a skew of a few ms shifts
deadlines by as much).

1. Request group (gateway -> ``request_stream``, through scripts.ENQUEUE, or the edge's
   MULTI/INCRBY/XADD/EXEC where it saw the queue at most half full: gateway/edge/dispatch.go), fields::

       r        id of the gateway holding the calls (replies go to keys.reply_list(r))
       h        JSON ``[enqueue ns, level, shape key, [corr, rows, deadline ns, timeout ns, ...], holding]``
                level: 0 = highest priority; shape key: requests with different keys never
                share a batch; deadline: the client's (or the gateway's default) deadline;
                timeout: end of the queue-policy timeout (0 = none); holding: calls the
                gateway held waiting for replies when it sent the group, these included
                (optional, absent = unknown): a broker that gathers only for requests that
                exist reads it (scheduler ``just_in_time``)
       0..k-1   each request's ModelInferRequest exactly as received on the wire
       t        (only when tracing) JSON ``[traceparent, ...]``, one per request ('' = not traced)

   The gateway validates requests but forwards the clients' own bytes: it
   never re-encodes tensors.

2. Cancellation (gateway -> the same ``request_stream``, plain XADD), fields::

       r        gateway id
       c        JSON ``[corr, ...]``: calls whose clients went away

   Sharing the request stream means the broker always reads a request
   before its cancellation.

3. Batch (broker -> ``pool_stream``), fields::

       m        model name          v   model version (ASCII)
       s        shape key of every member
       h        JSON ``[[gateway id, ...], [gateway index, corr, rows, enqueue ns, deadline ns, ...]]``
       0..n-1   the members' request bytes, in header order
       f        (optional) worker deaths this batch, or the batch it was split from, was
                running in (workers.recovery); absent = 0
       t        (only when tracing) JSON ``[traceparent, ...]``, one per member
       tb       (only when tracing) traceparent of the broker's ``batch`` span (ferry.tracing)

   Payloads stay separate fields, so forming a batch copies no tensor bytes
   in the broker; the worker joins them along the batch dimension once.
   A broker hands its own worker's batches over in-process (broker.handoff):
   those have no batch entry and no done notice (item 5).

4. Reply bundle (worker or broker -> ``reply_list``, via scripts.PUSH_REPLY): every
   reply of one batch for one gateway, each ``<u32 length><u64 corr><u8 status code><body>`` where body
   is, for status OK, the serialized ModelInferResponse (the gateway hands
   these bytes to gRPC untouched) or, for an error, the UTF-8 message.

5. Batch done (worker -> PUBLISH ``keys.done_channel(pool)``): JSON
   ``[model, version, rows, compute ns, [batch entry id, ...]]`` after a run's
   replies are written.  Brokers learn each model's batch latency and their
   pool's free capacity from it; a lost notice only delays both (the broker
   re-reads the pool's backlog).

6. Worker registration (worker -> ``keys.worker_info(id)``, rewritten every
   heartbeat with the heartbeat's TTL): JSON object ``WorkerInfo``::

       pool, runtime, host   where it runs and with what (onnx-cpu, onnx-gpu, neuron)
       devices               ["cpu"], ["cuda:0"], ["neuroncore:0", ...]
       models                [[name, version], ...] it loaded
       batch_sizes           {"name:version": [compiled sizes]} ([] = any up to max_batch_size)
       max_batch             {"name:version": max_batch_size}
       profile               {"name:version": {"rows": mean ms of a batch}}: its measured
                             batch latency, rows rounded up to a power of two
       batches               batches it ran since it started
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

F_REPLY = b"r"
F_HEADER = b"h"
F_MODEL = b"m"
F_VERSION = b"v"
F_SHAPE = b"s"
F_CANCEL = b"c"
F_FAILURES = b"f"
F_WHY = b"why"  # dead letters only: why the batch was dead-lettered
F_TRACE = b"t"
F_TRACE_BATCH = b"tb"

GROUP_STRIDE = 4  # corr, rows, deadline ns, timeout ns
BATCH_STRIDE = 5  # gateway index, corr, rows, enqueue ns, deadline ns

_REPLY_HEAD = struct.Struct("<IQB")

Fields = Mapping[bytes, bytes]
_FIELD_NAMES = [b"%d" % i for i in range(4096)]


def _field(i: int) -> bytes:
    return _FIELD_NAMES[i] if i < len(_FIELD_NAMES) else b"%d" % i


@dataclass(slots=True)
class Member:
    """One request, as the worker sees it."""

    gateway: str
    corr: int
    rows: int
    enqueued_ns: int
    deadline_ns: int
    payload: bytes
    trace: str = ""


@dataclass(slots=True)
class Group:
    """One request group, as the broker reads it."""

    gateway: str
    enqueued_ns: int
    level: int
    shape: str
    members: list[int]  # flat, GROUP_STRIDE per request
    payloads: list[bytes]
    traces: list[str]  # [] when none is traced
    holding: int = 0  # calls the gateway held (0: unknown)


@dataclass(slots=True)
class Queued:
    """One request as the gateway hands it to ``group_fields``."""

    corr: int
    rows: int
    deadline_ns: int
    timeout_ns: int
    payload: bytes
    trace: str = ""


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_DECODER = json.JSONDecoder()


def _loads(raw: bytes) -> Any:
    """``json.loads`` for the headers read once or more per request: ``raw_decode`` of the text skips
    loads' encoding detection and its Python frames, 4.1 -> 1.7 us a header (more with cold caches)."""
    text = raw.decode()
    value, end = _DECODER.raw_decode(text)
    if end != len(text):
        raise ValueError(f"unexpected data after the JSON value at {end}")
    return value


def group_fields(gateway: str, enqueued_ns: int, level: int, shape: str,
                 requests: Sequence[Queued], holding: int = 0) -> dict[bytes, bytes]:
    flat: list[int] = []
    fields: dict[bytes, bytes] = {F_REPLY: gateway.encode()}
    for i, q in enumerate(requests):
        flat += (q.corr, q.rows, q.deadline_ns, q.timeout_ns)
        fields[_field(i)] = q.payload
    fields[F_HEADER] = _json([enqueued_ns, level, shape, flat, holding])
    if any(q.trace for q in requests):
        fields[F_TRACE] = _json([q.trace for q in requests])
    return fields


def cancel_fields(gateway: str, corrs: Sequence[int]) -> dict[bytes, bytes]:
    return {F_REPLY: gateway.encode(), F_CANCEL: _json(list(corrs))}


def parse_cancel(fields: Fields) -> tuple[str, list[int]] | None:
    """(gateway, corrs) when the entry is a cancellation, else None."""
    raw = fields.get(F_CANCEL)
    return None if raw is None else (fields[F_REPLY].decode(), json.loads(raw))


def parse_group(fields: Fields) -> Group:
    enqueued_ns, level, shape, flat, *rest = _loads(fields[F_HEADER])
    n = len(flat) // GROUP_STRIDE
    traces = _loads(fields[F_TRACE]) if F_TRACE in fields else []
    return Group(fields[F_REPLY].decode(), enqueued_ns, level, shape, flat, [fields[_field(i)] for i in range(n)],
                 traces, int(rest[0]) if rest else 0)


def batch_fields(model: str, version: int, shape: str, members: Sequence[Member],
                 failures: int = 0, trace: str = "") -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {F_MODEL: model.encode(), F_VERSION: b"%d" % version, F_SHAPE: shape.encode()}
    if failures:
        fields[F_FAILURES] = b"%d" % failures
    gateways: dict[str, int] = {}
    flat: list[int] = []
    for i, m in enumerate(members):
        gi = gateways.setdefault(m.gateway, len(gateways))
        flat += (gi, m.corr, m.rows, m.enqueued_ns, m.deadline_ns)
        fields[_field(i)] = m.payload
    fields[F_HEADER] = _json([list(gateways), flat])
    if trace:
        fields[F_TRACE_BATCH] = trace.encode()
        fields[F_TRACE] = _json([m.trace for m in members])
    return fields


def parse_batch(fields: Fields) -> tuple[str, int, str, list[Member]]:
    gateways, flat = _loads(fields[F_HEADER])
    traces = _loads(fields[F_TRACE]) if F_TRACE in fields else None
    members = [
        Member(gateways[flat[j]], flat[j + 1], flat[j + 2], flat[j + 3], flat[j + 4], fields[_field(i)],
               traces[i] if traces else "")
        for i, j in enumerate(range(0, len(flat), BATCH_STRIDE))
    ]
    return fields[F_MODEL].decode(), int(fields[F_VERSION]), fields.get(F_SHAPE, b"").decode(), members


def batch_trace(fields: Fields) -> str:
    return fields.get(F_TRACE_BATCH, b"").decode()


def batch_failures(fields: Fields) -> int:
    return int(fields.get(F_FAILURES, b"0"))


def done_notice(model: str, version: int, rows: int, compute_ns: int, entry_ids: Sequence[bytes]) -> bytes:
    return _json([model, version, rows, compute_ns, [e.decode() for e in entry_ids]])


def parse_done(raw: bytes) -> tuple[str, int, int, int, list[bytes]]:
    model, version, rows, compute_ns, ids = _loads(raw)
    return model, int(version), int(rows), int(compute_ns), [i.encode() for i in ids]


def encode_reply(corr: int, code: int, body: bytes) -> bytes:
    return _REPLY_HEAD.pack(len(body), corr, code) + body


def reply_head(corr: int, code: int, size: int) -> bytes:
    """What ``encode_reply`` puts before a body of ``size`` bytes, for a reply joined from pieces."""
    return _REPLY_HEAD.pack(size, corr, code)


def iter_replies(bundle: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(corr, code, body) for each reply in a bundle."""
    pos, end, size = 0, len(bundle), _REPLY_HEAD.size
    while pos < end:
        length, corr, code = _REPLY_HEAD.unpack_from(bundle, pos)
        pos += size
        yield corr, code, bundle[pos : pos + length]
        pos += length


class Stat:
    """Field names of the per-model-version statistics hash (Triton's InferStatistics)."""

    SUCCESS_COUNT = "success_count"
    SUCCESS_NS = "success_ns"
    FAIL_COUNT = "fail_count"
    FAIL_NS = "fail_ns"
    QUEUE_NS = "queue_ns"
    COMPUTE_INPUT_NS = "compute_input_ns"
    COMPUTE_INFER_NS = "compute_infer_ns"
    COMPUTE_OUTPUT_NS = "compute_output_ns"
    INFERENCE_COUNT = "inference_count"
    EXECUTION_COUNT = "execution_count"
    LAST_INFERENCE_MS = "last_inference_ms"

    @staticmethod
    def batch(size: int, what: str) -> str:
        """Per-batch-size field; ``what`` is count, input_ns, infer_ns or output_ns."""
        return f"batch:{size}:{what}"

    @staticmethod
    @functools.cache
    def batch_fields(size: int) -> tuple[str, str, str, str]:
        """A batch size's four fields (count, input_ns, infer_ns, output_ns), made once per size."""
        return (Stat.batch(size, "count"), Stat.batch(size, "input_ns"), Stat.batch(size, "infer_ns"),
                Stat.batch(size, "output_ns"))


@dataclass
class WorkerInfo:
    """What a worker publishes about itself (message 6)."""

    pool: str
    runtime: str
    host: str
    devices: list[str]
    models: list[tuple[str, int]]
    batch_sizes: dict[str, list[int]]
    max_batch: dict[str, int]
    profile: dict[str, dict[str, float]]
    batches: int = 0

    def encode(self) -> bytes:
        return _json({
            "pool": self.pool, "runtime": self.runtime, "host": self.host, "devices": self.devices,
            "models": [[n, v] for n, v in self.models], "batch_sizes": self.batch_sizes,
            "max_batch": self.max_batch, "profile": self.profile, "batches": self.batches,
        })

    @classmethod
    def decode(cls, raw: bytes) -> WorkerInfo:
        d = json.loads(raw)
        return cls(
            pool=d["pool"], runtime=d.get("runtime", ""), host=d.get("host", ""), devices=d.get("devices", []),
            models=[(str(n), int(v)) for n, v in d["models"]], batch_sizes=d.get("batch_sizes", {}),
            max_batch=d.get("max_batch", {}), profile=d.get("profile", {}), batches=int(d.get("batches", 0)),
        )


def model_label(name: str, version: int) -> str:
    """How WorkerInfo keys its per-model maps."""
    return f"{name}:{version}"
