"""Layouts of the three messages that cross Redis.

1. Request entry (gateway -> ``request_stream``), fields::

       r  reply list key of the gateway holding the call
       c  correlation number, unique within that gateway (ASCII)
       n  rows the request contributes to a batch (ASCII; 1 for unbatched models)
       t  enqueue time, ns since the epoch (ASCII), for queue statistics
       p  the client's ModelInferRequest exactly as received on the wire

   The gateway validates the request but forwards the client's own bytes: it
   never re-encodes tensors.

2. Batch entry (broker -> ``pool_stream``), fields::

       m  model name            v  model version (ASCII)
       h  JSON list of [reply key, correlation, rows, enqueue ns] per member
       0 .. k-1  each member's ModelInferRequest bytes, in ``h`` order

   Payloads stay separate fields, so forming a batch copies no tensor bytes
   in the broker; the worker concatenates along the batch dimension once.

3. Reply (worker -> ``reply_list``): ``<u64 correlation><u8 status code>`` then,
   for status OK, the serialized ModelInferResponse (the gateway hands these
   bytes to gRPC untouched) or, for an error, the UTF-8 message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

REQ_REPLY = b"r"
REQ_CORR = b"c"
REQ_ROWS = b"n"
REQ_ENQUEUED = b"t"
REQ_PAYLOAD = b"p"

BATCH_MODEL = b"m"
BATCH_VERSION = b"v"
BATCH_MEMBERS = b"h"

_REPLY_HEAD = struct.Struct("<QB")

Fields = Mapping[bytes, bytes]


@dataclass(slots=True)
class Member:
    """One request inside the broker and the worker."""

    reply: str
    corr: int
    rows: int
    enqueued_ns: int
    payload: bytes


def request_fields(reply: str, corr: int, rows: int, enqueued_ns: int, payload: bytes) -> dict[bytes, bytes]:
    return {
        REQ_REPLY: reply.encode(),
        REQ_CORR: b"%d" % corr,
        REQ_ROWS: b"%d" % rows,
        REQ_ENQUEUED: b"%d" % enqueued_ns,
        REQ_PAYLOAD: payload,
    }


def parse_request(fields: Fields) -> Member:
    return Member(
        reply=fields[REQ_REPLY].decode(),
        corr=int(fields[REQ_CORR]),
        rows=int(fields[REQ_ROWS]),
        enqueued_ns=int(fields[REQ_ENQUEUED]),
        payload=fields[REQ_PAYLOAD],
    )


def batch_fields(model: str, version: int, members: list[Member]) -> dict[bytes, bytes]:
    head = [[m.reply, m.corr, m.rows, m.enqueued_ns] for m in members]
    fields: dict[bytes, bytes] = {
        BATCH_MODEL: model.encode(),
        BATCH_VERSION: b"%d" % version,
        BATCH_MEMBERS: json.dumps(head, separators=(",", ":")).encode(),
    }
    for i, m in enumerate(members):
        fields[b"%d" % i] = m.payload
    return fields


def parse_batch(fields: Fields) -> tuple[str, int, list[Member]]:
    head = json.loads(fields[BATCH_MEMBERS])
    members = [
        Member(reply=r, corr=c, rows=n, enqueued_ns=t, payload=fields[b"%d" % i])
        for i, (r, c, n, t) in enumerate(head)
    ]
    return fields[BATCH_MODEL].decode(), int(fields[BATCH_VERSION]), members


def encode_reply(corr: int, code: int, body: bytes) -> bytes:
    return _REPLY_HEAD.pack(corr, code) + body


def decode_reply(raw: bytes) -> tuple[int, int, bytes]:
    corr, code = _REPLY_HEAD.unpack_from(raw)
    return corr, code, raw[_REPLY_HEAD.size :]


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
