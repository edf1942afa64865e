"""Just enough of the protobuf wire format to write messages without building objects.

The gateway wraps worker responses in ModelStreamInferResponse and the worker
writes ModelInferResponse bytes directly; both need the same two primitives.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): tag, length, payload."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
