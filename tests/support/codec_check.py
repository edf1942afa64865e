"""workers.codec.decode's own reading of a request against protobuf's, run as a subprocess by
tests/test_codec.py (Ferry's ``protos`` cannot share the pytest process with tritonclient).

Prints one JSON object: ``{"cases": n, "fast": how many the field walk answered itself,
"mismatches": [description, ...]}``. A mismatch is any payload where ``decode`` and
``_decode_message`` (protobuf's parser, the reference) disagree: a different result, or one
answering where the other raises, or different errors.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import numpy as np

from ferry import datatypes
from ferry.model_config import TensorSpec
from ferry.pbwire import len_field, varint
from protos import grpc_service_pb2 as pb
from workers import codec

SPECS: dict[str, Any] = {"INPUT0": None, "INPUT1": None}  # decode only looks the names up


def request(*, inputs: tuple[tuple[str, list[int]], ...] = (("INPUT0", [1, 4]),), outputs: tuple[str, ...] = (),
            rid: str = "", raw: bool = True, params: bool = False) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp", model_version="1", id=rid)
    for name, shape in inputs:
        t = req.inputs.add(name=name, datatype="FP32", shape=shape)
        data = np.arange(int(np.prod(shape)), dtype=np.float32)
        if raw:
            req.raw_input_contents.append(data.tobytes())
        else:
            t.contents.fp32_contents.extend(data.tolist())
    for name in outputs:
        req.outputs.add(name=name)
    if params:  # what perf_analyzer sends with every request, and tritonclient's priority
        req.parameters["triton_enable_empty_final_response"].bool_param = True
        req.parameters["priority"].uint64_param = 1
    return req


def outcome(fn: Any, payload: bytes) -> tuple[Any, ...]:
    try:
        d = fn(SPECS, payload)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    arrays = None if d.arrays is None else {k: v.tolist() for k, v in d.arrays.items()}
    return ("ok", d.request_id, d.requested, d.shapes, d.raw, arrays)


def main() -> None:
    rng = random.Random(20261127)
    base = [
        request(),
        request(outputs=("OUTPUT0",)),
        request(rid="req-7", outputs=("OUTPUT0", "OUTPUT1")),
        request(rid="ünïcode-id"),
        request(inputs=(("INPUT0", [2, 4]), ("INPUT1", [2, 3]))),
        request(inputs=(("INPUT0", [1, 40_000]),)),  # a three-byte length
        request(params=True, outputs=("OUTPUT0",)),
        request(raw=False),  # typed contents: protobuf's path
        request(inputs=(("NOPE", [1, 4]),)),  # an input the model lacks: InvalidArgument either way
    ]
    payloads = [r.SerializeToString() for r in base]
    t = pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 4]).SerializeToString()
    data = np.arange(4, dtype=np.float32).tobytes()
    payloads += [
        # Legal orders and repeats protobuf accepts: raw bytes first, the id twice (the last one wins).
        len_field(7, data) + len_field(5, t) + len_field(1, b"mlp"),
        len_field(3, b"first") + len_field(5, t) + len_field(7, data) + len_field(3, b"second"),
        # A length written in more bytes than it needs (still legal).
        b"\x2a" + bytes([0x80 | len(t), 0x00]) + t + len_field(7, data),
        # An unknown field, a varint field, a bad UTF-8 id, a bad UTF-8 model name, fewer raw than inputs.
        len_field(5, t) + len_field(7, data) + len_field(15, b"x"),
        len_field(5, t) + len_field(7, data) + varint(2 << 3 | 0) + b"\x05",
        len_field(3, b"\xff\xfe") + len_field(5, t) + len_field(7, data),
        len_field(1, b"\xc3") + len_field(5, t) + len_field(7, data),
        len_field(5, t) + len_field(5, t),
        b"",
    ]
    parent = {p: p for p in payloads}  # which valid request each payload was made from
    for p in list(payloads[:7]):  # truncations: every one of the small requests, some of the big one
        for n in (range(len(p)) if len(p) < 1000 else rng.sample(range(len(p)), 200)):
            payloads.append(p[:n])
            parent.setdefault(p[:n], p)
    for _ in range(4000):  # random corruptions of valid requests
        base = rng.choice(payloads[:7])
        c = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(c))
            c[i] = rng.randrange(256) if rng.random() < 0.7 else c[i] ^ (1 << rng.randrange(8))
        payloads.append(bytes(c))
        parent.setdefault(bytes(c), base)
    # The same requests with other tensor contents: what a Decoder's remembered layouts serve.
    for p in list(payloads[:7]):
        for _ in range(3):
            q = bytearray(p)
            for i in range(len(q) - 8, len(q)):  # the last raw tensor's last bytes (all are raw-last)
                q[i] = rng.randrange(256)
            payloads.append(bytes(q))
            parent.setdefault(bytes(q), p)
    mismatches = []
    fast = 0
    # A Decoder that has just seen the payload's parent (so a same-size corruption meets the parent's
    # layout and must be told apart from it), then the payload twice (the second from its own layout);
    # and one Decoder for all of them, as a worker has one per model (its misses turn layouts off for
    # a while, and its probes turn them on again).
    shared = codec.Decoder(SPECS)
    for p in payloads:
        if codec._decode_common(SPECS, p) is not None:
            fast += 1
        ref = outcome(codec._decode_message, p)
        primed = codec.Decoder(SPECS)
        with contextlib.suppress(Exception):
            primed.decode(parent[p])
        for name, fn in (("decode", codec.decode), ("Decoder after the parent", _with(primed)),
                         ("Decoder again", _with(primed)), ("shared Decoder", _with(shared))):
            ours = outcome(fn, p)
            if ours != ref:
                mismatches.append(f"{p[:80].hex()}: {name} {ours!r:.300} != protobuf {ref!r:.300}")
    mismatches += check_responses(rng)
    json.dump({"cases": len(payloads), "fast": fast, "layouts": len(shared._layouts),
               "mismatches": mismatches[:20]}, sys.stdout)


def _with(decoder: codec.Decoder) -> Any:
    """``decoder.decode`` shaped as ``outcome`` calls a decode function."""
    return lambda _specs, payload: decoder.decode(payload)


def check_responses(rng: random.Random) -> list[str]:
    """ResponseEncoder.encode, and bodies joined from its ``pieces``, against protobuf's serialisation."""
    outputs = [TensorSpec("OUTPUT0", datatypes.BY_NAME["FP32"], (10,)),
               TensorSpec("OUT_1", datatypes.BY_NAME["INT64"], (5, 2))]
    specs = {t.name: t for t in outputs}
    mv = SimpleNamespace(name="mlp", version=3, settings=SimpleNamespace(outputs=outputs))
    encoder = codec.ResponseEncoder(mv)  # type: ignore[arg-type]
    wrong = []
    for rid in ("", "req-1", "ünï", "x" * 300):
        for names in ((), ("OUTPUT0",), ("OUT_1",), ("OUT_1", "OUTPUT0"), ("OUTPUT0", "OUT_1")):
            for rows in (1, 3, 200):
                tensors = [(n, (rows, *specs[n].dims), rng.randbytes(rows * specs[n].dtype.size * 10)) for n in names]
                ref = pb.ModelInferResponse(model_name="mlp", model_version="3", id=rid)
                for n, shape, data in tensors:
                    ref.outputs.add(name=n, datatype=specs[n].dtype.name, shape=shape)
                    ref.raw_output_contents.append(data)
                want = ref.SerializeToString()
                pieces = encoder.pieces(rid, [(n, shape, len(data)) for n, shape, data in tensors])
                joined = b"".join(part for before, (_, _, data) in zip(pieces.before, tensors, strict=True)
                                  for part in (before, data)) if tensors else pieces.before[0]
                for how, got in (("encode", encoder.encode(rid, tensors)), ("pieces", joined)):
                    if got != want:
                        wrong.append(f"response {rid!r} {names} x{rows}: {how} {got[:60].hex()} != {want[:60].hex()}")
                if pieces.size != len(want):
                    wrong.append(f"response {rid!r} {names} x{rows}: pieces.size {pieces.size} != {len(want)}")
    return wrong


if __name__ == "__main__":
    main()
