"""Request decoding and response encoding for the worker, tuned for the batch path.

Requests are read the same way in reverse.  A ModelInferRequest as clients send
it (tritonclient, perf_analyzer, the edge passing a client's bytes on) is a few
top-level fields: the model's name and version, maybe an id and parameters, one
small InferInputTensor per input, the requested outputs, and the raw tensor bytes.
``decode`` walks those fields itself and parses only the small sub-messages with
protobuf, each distinct one once (they repeat from request to request), because
building protobuf's wrappers for every field cost 5-7 us a request, about a
tenth of the colocated broker's CPU per request under load.  Anything it does
not expect (typed contents, an unknown field, a malformed length) goes to
protobuf's own parser instead, which answers exactly as before;
tests/support/codec_check.py holds both to the same results.

A worker keeps one ``Decoder`` per model version, which also remembers the byte
layout of the last request of each size: the next one whose every byte but its
tensors is the same decodes to the same request, found by a few byte compares.

Responses are written straight in protobuf wire format: the parts that do not
change per request (model name and version, each output's name, datatype and
shape) are encoded once and cached, so a reply costs a few byte joins instead
of building and serialising a message object; ``ResponseEncoder.pieces`` gives
everything around the tensor bytes at once, so that workers.batch joins each
reply in one step.  tests/support/codec_check.py checks the bytes against
protobuf's own serialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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
    raw: dict[str, bytes | memoryview] | None  # raw_input_contents by name, when the client sent raw
    arrays: dict[str, np.ndarray[Any, Any]] | None  # typed contents, decoded


# Top-level fields of ModelInferRequest the fast path reads, by their one-byte tag (wire type 2).
_MODEL_NAME, _MODEL_VERSION, _ID, _PARAMETER, _INPUT, _OUTPUT, _RAW = 0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A
_FAST_TAGS = frozenset((_MODEL_NAME, _MODEL_VERSION, _ID, _PARAMETER, _INPUT, _OUTPUT, _RAW))
# Sub-messages parsed once and remembered: few distinct ones exist (one per input shape, output
# name and request parameter a client uses; perf_analyzer sends triton_enable_empty_final_response
# with every request). Bounded, so a client that varies them cannot grow the worker.
_SEEN_MAX = 4096
_SEEN_KEY_MAX = 512
_inputs_seen: dict[bytes, tuple[str, tuple[int, ...]]] = {}  # -> (name, shape)
_outputs_seen: dict[bytes, str] = {}  # -> name
_parameters_seen: dict[bytes, bool] = {}  # -> True: valid (the worker does not use them)
_T = TypeVar("_T")


def _parse_once(seen: dict[bytes, _T], field: bytes, parse: Callable[[bytes], _T]) -> _T | None:
    """``parse(field)``, remembered in ``seen`` while it has room; None if protobuf refuses it."""
    try:
        value = parse(field)
    except Exception:
        return None
    if len(field) <= _SEEN_KEY_MAX and len(seen) < _SEEN_MAX:
        seen[field] = value
    return value


def _input_of(field: bytes) -> tuple[str, tuple[int, ...]]:
    t = pb.ModelInferRequest.InferInputTensor.FromString(field)
    return t.name, tuple(t.shape)


def _output_of(field: bytes) -> str:
    return str(pb.ModelInferRequest.InferRequestedOutputTensor.FromString(field).name)


def _parameter_of(field: bytes) -> bool:
    pb.ModelInferRequest.ParametersEntry.FromString(field)
    return True


def decode(specs: dict[str, TensorSpec], payload: bytes) -> Decoded:
    """One request's inputs. Raises what protobuf's parser raises for a malformed payload, and
    InvalidArgument for an input the model does not have."""
    return _decode_common(specs, payload) or _decode_message(specs, payload)


@dataclass(slots=True, frozen=True)
class _Layout:
    """A request read by the field walk, as bytes: where its raw tensors lie, and every other byte.

    Whether the walk reads a field, and how far it skips, depends only on tag and length bytes,
    never on tensor contents; so a payload of the same size whose every other byte is the same
    decodes to the same request with its own tensors at the same offsets."""

    fixed: tuple[tuple[int, bytes], ...]  # (offset, bytes) of each run between raw tensors
    raws: tuple[tuple[str, int, int], ...]  # (input name, start, end) of each raw tensor
    request_id: str
    requested: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]  # shared by every request decoded from it: read only


class Decoder:
    """``decode`` for one model, remembering the layout of the last request of each size.

    Clients send the same request over and over with new tensor contents (perf_analyzer,
    tritonclient in a loop, any stub reusing its message): those are recognised by comparing the
    bytes around the tensors (a few C-level compares, 1.5 us) instead of walking the fields in
    Python (3.3 us, half of the worker's own Python per request before).  Anything else is walked
    as ``decode`` does."""

    MAX_LAYOUTS = 64  # distinct sizes remembered; a client varying them cannot grow the worker
    # Looking a layout up and remembering a new one cost about as much as a walk.  Requests that
    # differ every time (an id per call) would pay that on every one, so layouts are used only while
    # they pay off (hits at least match misses, both decaying), and otherwise tried on every 64th
    # request; a hit then starts the count afresh.
    PROBE_EVERY = 64
    DECAY_AT = 4096

    def __init__(self, specs: dict[str, TensorSpec]) -> None:
        self.specs = specs
        self._layouts: dict[int, _Layout] = {}
        self._hits = 0
        self._misses = 0

    def decode(self, payload: bytes) -> Decoded:
        if self._hits < self._misses and self._misses % self.PROBE_EVERY:
            self._misses += 1
            return decode(self.specs, payload)  # layouts are not paying off: walk
        layout = self._layouts.get(len(payload))
        if layout is not None and all(payload.startswith(run, at) for at, run in layout.fixed):
            if self._hits < self._misses:
                self._hits = self._misses = 0  # a probe hit: repeated requests again
            self._hits += 1
            view = memoryview(payload)
            return Decoded(layout.request_id, layout.requested, layout.shapes,
                           {name: view[start:end] for name, start, end in layout.raws}, None)
        self._misses += 1
        if self._hits + self._misses >= self.DECAY_AT:
            self._hits //= 2
            self._misses //= 2
        spans: list[tuple[int, int]] = []
        named: dict[str, tuple[int, int]] = {}
        d = _decode_common(self.specs, payload, spans, named)
        if d is None:
            return _decode_message(self.specs, payload)
        if len(self._layouts) >= self.MAX_LAYOUTS:
            self._layouts.clear()
        fixed, at = [], 0
        for start, end in spans:  # every raw tensor, used or not: its contents never steer the walk
            fixed.append((at, payload[at:start]))
            at = end
        fixed.append((at, payload[at:]))
        self._layouts[len(payload)] = _Layout(tuple((off, run) for off, run in fixed if run),
                                              tuple((name, *span) for name, span in named.items()),
                                              d.request_id, d.requested, d.shapes)
        return d


def _decode_common(specs: dict[str, TensorSpec], buf: bytes, spans: list[tuple[int, int]] | None = None,
                   named: dict[str, tuple[int, int]] | None = None) -> Decoded | None:
    """The common shape of a request (raw inputs), read field by field; None for anything else,
    which ``_decode_message`` then parses.  For ``Decoder``: ``spans`` gets the (start, end) offsets
    of every raw tensor, ``named`` those of the one each input of the result takes."""
    pos, size = 0, len(buf)
    request_id = ""
    inputs: list[bytes] = []
    outputs: list[bytes] = []
    raw_at = spans if spans is not None else []  # (start, end) of each raw tensor
    view = memoryview(buf)
    while pos < size:
        tag = buf[pos]
        if tag not in _FAST_TAGS or pos + 1 >= size:
            return None
        length = buf[pos + 1]
        pos += 2
        if length & 0x80:  # a longer varint: at most 4 bytes here (lengths under 256 MiB)
            length &= 0x7F
            shift = 7
            while True:
                if pos >= size or shift > 21:
                    return None
                b = buf[pos]
                pos += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
        end = pos + length
        if end > size:
            return None
        if tag == _RAW:
            raw_at.append((pos, end))
        elif tag == _INPUT:
            inputs.append(buf[pos:end])
        elif tag == _OUTPUT:
            outputs.append(buf[pos:end])
        elif tag == _PARAMETER:
            # The worker does not use request parameters (the gateway read them), but protobuf
            # would refuse a malformed one: parse each distinct entry once.
            entry = buf[pos:end]
            if entry not in _parameters_seen and _parse_once(_parameters_seen, entry, _parameter_of) is None:
                return None
        else:  # the id, the model's name or version: protobuf refuses bad UTF-8 in any of them
            try:
                text = buf[pos:end].decode()
            except UnicodeDecodeError:
                return None
            if tag == _ID:
                request_id = text
        pos = end
    if not inputs or len(raw_at) != len(inputs):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    by_name: dict[str, bytes | memoryview] = {}
    for i, field in enumerate(inputs):
        seen = _inputs_seen.get(field) or _parse_once(_inputs_seen, field, _input_of)
        if seen is None:
            return None
        name = seen[0]
        if name not in specs:
            return None
        shapes[name] = seen[1]
        start, end = raw_at[i]
        by_name[name] = view[start:end]  # a view: the batch join copies the tensor bytes once
        if named is not None:
            named[name] = raw_at[i]
    requested = []
    for field in outputs:
        out = _outputs_seen.get(field)
        if out is None and (out := _parse_once(_outputs_seen, field, _output_of)) is None:
            return None
        requested.append(out)
    return Decoded(request_id, tuple(requested), shapes, by_name, None)


def _decode_message(specs: dict[str, TensorSpec], payload: bytes) -> Decoded:
    req = pb.ModelInferRequest.FromString(payload)
    shapes: dict[str, tuple[int, ...]] = {}
    for t in req.inputs:
        if t.name not in specs:
            raise InvalidArgument(f"unexpected input {t.name!r}")
        shapes[t.name] = tuple(t.shape)
    requested = tuple(o.name for o in req.outputs)
    raw_list = req.raw_input_contents
    if raw_list:
        raw: dict[str, bytes | memoryview] = {t.name: raw_list[i] for i, t in enumerate(req.inputs)}
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
        pieces = self.pieces(request_id, [(name, shape, len(data)) for name, shape, data in tensors])
        return b"".join(pieces.around([data for _, _, data in tensors]))

    def pieces(self, request_id: str, tensors: Sequence[tuple[str, tuple[int, ...], int]]) -> BodyPieces:
        """The response's bytes around its tensors' data, for tensors of known sizes ((output name,
        shape, byte count) in response order).  The one place the response's layout is written;
        workers.batch keeps the pieces per kind of reply, so that each reply is one join."""
        head = [self._prefix]
        if request_id:
            head.append(len_field(3, request_id.encode()))
        head += [self._tensor(name, shape) for name, shape, _ in tensors]
        before = [b"\x32" + varint(n) for _, _, n in tensors]  # field 6: raw_output_contents
        if not before:
            return BodyPieces((b"".join(head),), sum(map(len, head)))
        before[0] = b"".join(head) + before[0]
        return BodyPieces(tuple(before), sum(map(len, before)) + sum(n for _, _, n in tensors))


@dataclass(slots=True, frozen=True)
class BodyPieces:
    """ResponseEncoder.pieces: the bytes before each tensor's data (just the body, without
    tensors), and the body's size."""

    before: tuple[bytes, ...]
    size: int

    def around(self, data: Sequence[bytes]) -> list[bytes]:
        """The body's parts with ``data`` (one per tensor, in order) in place, to join."""
        if not data:
            return [self.before[0]]
        parts: list[bytes] = []
        for before, chunk in zip(self.before, data, strict=True):
            parts += (before, chunk)
        return parts
