"""Layouts of the three messages that cross Redis.

Requests travel in *groups*: whatever one gateway received for one model
version between two of its Redis round trips (at most max_batch_size rows),
so Redis, the broker and the worker pay per group, not per request.

1. Request group (gateway -> ``request_stream``), fields::

       r        id of the gateway holding the calls (replies go to keys.reply_list(r))
       h        JSON ``[enqueue ns, [corr, rows, corr, rows, ...]]``
       0..k-1   each request's ModelInferRequest exactly as received on the wire

   The gateway validates requests but forwards the clients' own bytes: it
   never re-encodes tensors.

2. Batch (broker -> ``pool_stream``), fields::

       m        model name          v   model version (ASCII)
       h        JSON ``[[gateway id, enqueue ns, [corr, rows, ...]], ...]`` per group
       0..n-1   the members' request bytes, in header order across groups

   Payloads stay separate fields, so forming a batch copies no tensor bytes
   in the broker; the worker joins them along the batch dimension once.

3. Reply bundle (worker -> ``reply_list``, via scripts.PUSH_REPLY): every
   reply of one batch for one gateway, each ``<u32 length><u64 corr><u8 status code><body>`` where body
   is, for status OK, the serialized ModelInferResponse (the gateway hands
   these bytes to gRPC untouched) or, for an error, the UTF-8 message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

F_REPLY = b"r"
F_HEADER = b"h"
F_MODEL = b"m"
F_VERSION = b"v"

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
    payload: bytes


@dataclass(slots=True)
class Group:
    """One request group, as the broker sees it: never split, never parsed deeper."""

    gateway: str
    enqueued_ns: int
    members: list[int]  # flat [corr, rows, corr, rows, ...]
    payloads: list[bytes]
    rows: int


def group_fields(gateway: str, enqueued_ns: int, requests: Sequence[tuple[int, int, bytes]]) -> dict[bytes, bytes]:
    """Fields of one request group; ``requests`` are (corr, rows, payload)."""
    flat: list[int] = []
    fields: dict[bytes, bytes] = {F_REPLY: gateway.encode()}
    for i, (corr, rows, payload) in enumerate(requests):
        flat += (corr, rows)
        fields[_field(i)] = payload
    fields[F_HEADER] = json.dumps([enqueued_ns, flat], separators=(",", ":")).encode()
    return fields


def parse_group(fields: Fields) -> Group:
    enqueued_ns, flat = json.loads(fields[F_HEADER])
    n = len(flat) // 2
    return Group(
        gateway=fields[F_REPLY].decode(),
        enqueued_ns=enqueued_ns,
        members=flat,
        payloads=[fields[_field(i)] for i in range(n)],
        rows=sum(flat[1::2]),
    )


def batch_fields(model: str, version: int, groups: Sequence[Group]) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {F_MODEL: model.encode(), F_VERSION: b"%d" % version}
    head = []
    i = 0
    for g in groups:
        head.append([g.gateway, g.enqueued_ns, g.members])
        for p in g.payloads:
            fields[_field(i)] = p
            i += 1
    fields[F_HEADER] = json.dumps(head, separators=(",", ":")).encode()
    return fields


def parse_batch(fields: Fields) -> tuple[str, int, list[Member]]:
    members: list[Member] = []
    i = 0
    for gateway, enqueued_ns, flat in json.loads(fields[F_HEADER]):
        for j in range(0, len(flat), 2):
            members.append(Member(gateway, flat[j], flat[j + 1], enqueued_ns, fields[_field(i)]))
            i += 1
    return fields[F_MODEL].decode(), int(fields[F_VERSION]), members


def encode_reply(corr: int, code: int, body: bytes) -> bytes:
    return _REPLY_HEAD.pack(len(body), corr, code) + body


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
