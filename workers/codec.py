"""Request decoding and response encoding for the worker, tuned for the batch path.

Responses are written straight in protobuf wire format: the parts that do not
change per request (model name and version, each output's name, datatype and
shape) are encoded once and cached, so a reply costs a few byte joins instead
of building and serialising a message object.  ``tests`` check the bytes
against protobuf's own serialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry import datatypes
from ferry.errors import InvalidArgument
from ferry.model_config import TensorSpec
from ferry.pbwire import len_field, varint
from ferry.repository import ModelVersion
from protos import grpc_service_pb2 as pb


@dataclass(slots=True)
class Decoded:
    """One request's inputs: per model input, its shape and raw bytes or decoded array."""

    request_id: str
    requested: tuple[str, ...]  # requested outputs; () = all
    shapes: dict[str, tuple[int, ...]]
    raw: dict[str, bytes] | None  # raw_input_contents by name, when the client sent raw
    arrays: dict[str, np.ndarray[Any, Any]] | None  # typed contents, decoded


def decode(specs: dict[str, TensorSpec], payload: bytes) -> Decoded:
    req = pb.ModelInferRequest.FromString(payload)
    shapes: dict[str, tuple[int, ...]] = {}
    for t in req.inputs:
        if t.name not in specs:
            raise InvalidArgument(f"unexpected input {t.name!r}")
        shapes[t.name] = tuple(t.shape)
    requested = tuple(o.name for o in req.outputs)
    raw_list = req.raw_input_contents
    if raw_list:
        raw = {t.name: raw_list[i] for i, t in enumerate(req.inputs)}
        return Decoded(req.id, requested, shapes, raw, None)
    arrays = {}
    for t in req.inputs:
        dtype = specs[t.name].dtype
        values = getattr(t.contents, dtype.contents_field or "")
        arrays[t.name] = datatypes.decode_contents(dtype, shapes[t.name], values)
    return Decoded(req.id, requested, shapes, None, arrays)


def input_array(spec: TensorSpec, d: Decoded) -> np.ndarray[Any, Any]:
    if d.arrays is not None:
        return d.arrays[spec.name]
    assert d.raw is not None
    return datatypes.decode_raw(spec.dtype, d.shapes[spec.name], d.raw[spec.name])


def join_inputs(spec: TensorSpec, members: list[Decoded], rows: int) -> np.ndarray[Any, Any]:
    """One batch tensor from every member's input, copying each byte once."""
    if len(members) == 1:
        return input_array(spec, members[0])
    if not spec.dtype.is_bytes and all(d.raw is not None for d in members):
        joined = b"".join(d.raw[spec.name] for d in members)  # type: ignore[index]
        shape = (rows, *members[0].shapes[spec.name][1:])
        return np.frombuffer(joined, dtype=spec.dtype.numpy).reshape(shape)
    return np.concatenate([input_array(spec, d) for d in members])


class ResponseEncoder:
    """Builds ModelInferResponse bytes for one model version."""

    def __init__(self, mv: ModelVersion) -> None:
        self._prefix = len_field(1, mv.name.encode()) + len_field(2, str(mv.version).encode())
        self.outputs = {t.name: t for t in mv.settings.outputs}
        self.all_outputs = tuple(t.name for t in mv.settings.outputs)
        self._tensor_cache: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def _tensor(self, name: str, shape: tuple[int, ...]) -> bytes:
        key = (name, shape)
        cached = self._tensor_cache.get(key)
        if cached is None:
            packed = b"".join(varint(d) for d in shape)
            body = (len_field(1, name.encode()) + len_field(2, self.outputs[name].dtype.name.encode())
                    + len_field(3, packed))
            cached = len_field(5, body)
            if len(self._tensor_cache) < 4096:
                self._tensor_cache[key] = cached
        return cached

    def encode(self, request_id: str, tensors: list[tuple[str, tuple[int, ...], bytes]]) -> bytes:
        """``tensors``: (output name, shape, raw bytes) in response order."""
        parts = [self._prefix]
        if request_id:
            parts.append(len_field(3, request_id.encode()))
        for name, shape, _ in tensors:
            parts.append(self._tensor(name, shape))
        for _, _, data in tensors:
            parts.append(b"\x32" + varint(len(data)))  # field 6: raw_output_contents
            parts.append(data)
        return b"".join(parts)
