"""Run one batch: decode members, concatenate, one model call, split, encode replies.

Members whose non-batch dimensions differ cannot share a tensor, so they run
as separate sub-batches; a member that fails to decode gets its own error
reply and the rest of the batch still runs.  A model execution error fails
that (sub-)batch's members with INTERNAL and nothing else.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.messages import Member, Stat, encode_reply
from ferry import datatypes
from ferry.errors import Code, FerryError, Internal, InvalidArgument
from ferry.repository import ModelVersion
from protos import grpc_service_pb2 as pb
from workers.runtime import Arrays, Runtime

log = logging.getLogger("ferry.worker")


@dataclass(slots=True)
class BatchResult:
    replies: list[tuple[str, bytes]] = field(default_factory=list)  # (reply key, reply)
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass(slots=True)
class _Decoded:
    member: Member
    request: Any  # pb.ModelInferRequest
    arrays: Arrays


def decode_member(mv: ModelVersion, member: Member) -> _Decoded:
    request = pb.ModelInferRequest.FromString(member.payload)
    specs = {t.name: t for t in mv.settings.inputs}
    raw = request.raw_input_contents
    arrays: Arrays = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"unexpected input {tensor.name!r}")
        shape = tuple(tensor.shape)
        try:
            if raw:
                arrays[tensor.name] = datatypes.decode_raw(spec.dtype, shape, raw[i])
            else:
                field_name = spec.dtype.contents_field or ""
                values = getattr(tensor.contents, field_name)
                arrays[tensor.name] = datatypes.decode_contents(spec.dtype, shape, values)
        except (ValueError, IndexError) as exc:
            raise InvalidArgument(f"input {tensor.name!r}: cannot decode: {exc}") from None
    return _Decoded(member, request, arrays)


def _response(mv: ModelVersion, request: Any, outputs: Arrays, start: int, stop: int | None) -> bytes:
    resp = pb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request.id)
    names = [o.name for o in request.outputs] or [o.name for o in mv.settings.outputs]
    dtypes = {o.name: o.dtype for o in mv.settings.outputs}
    for name in names:
        full = outputs[name]
        part = full if stop is None else full[start:stop]
        resp.outputs.add(name=name, datatype=dtypes[name].name, shape=part.shape)
        resp.raw_output_contents.append(datatypes.encode_raw(dtypes[name], part))
    return bytes(resp.SerializeToString())


def run_batch(mv: ModelVersion, runtime: Runtime, members: Sequence[Member]) -> BatchResult:
    result = BatchResult()
    stats = result.stats
    start_ns = time.time_ns()
    t0 = time.perf_counter_ns()
    groups: dict[tuple[Any, ...], list[_Decoded]] = defaultdict(list)
    for m in members:
        try:
            d = decode_member(mv, m)
        except FerryError as exc:
            result.replies.append((m.reply, encode_reply(m.corr, exc.code, exc.message.encode())))
            stats[Stat.FAIL_COUNT] += 1
            continue
        except Exception as exc:  # a malformed payload must not take the worker down
            result.replies.append((m.reply, encode_reply(m.corr, Code.INVALID_ARGUMENT, str(exc).encode())))
            stats[Stat.FAIL_COUNT] += 1
            continue
        sig = tuple((n, a.shape[1:] if mv.settings.max_batch_size else a.shape) for n, a in d.arrays.items())
        groups[sig].append(d)
    output_names = [o.name for o in mv.settings.outputs]
    input_names = [t.name for t in mv.settings.inputs]
    decode_ns = time.perf_counter_ns() - t0
    for group in groups.values():
        _run_group(mv, runtime, group, input_names, output_names, result, start_ns, decode_ns)
    return result


def _run_group(
    mv: ModelVersion, runtime: Runtime, group: list[_Decoded], input_names: list[str],
    output_names: list[str], result: BatchResult, start_ns: int, decode_ns: int,
) -> None:
    stats = result.stats
    batched = mv.settings.max_batch_size > 0
    t0 = time.perf_counter_ns()
    if batched and len(group) > 1:
        inputs = {n: np.concatenate([d.arrays[n] for d in group]) for n in input_names}
    else:
        inputs = group[0].arrays
    t1 = time.perf_counter_ns()
    try:
        outputs = runtime.run(inputs, output_names)
        rows = sum(d.member.rows for d in group)
        if batched and any(outputs[n].shape[:1] != (rows,) for n in output_names):
            raise Internal(f"model returned outputs whose first dimension is not the batch size {rows}")
    except Exception as exc:
        message = exc.message if isinstance(exc, FerryError) else f"model execution failed: {exc}"
        log.warning("model %s v%d failed a batch of %d: %s", mv.name, mv.version, len(group), message)
        for d in group:
            result.replies.append((d.member.reply, encode_reply(d.member.corr, Code.INTERNAL, message.encode())))
        stats[Stat.FAIL_COUNT] += len(group)
        return
    t2 = time.perf_counter_ns()
    offset = 0
    now_ns = time.time_ns()
    for d in group:
        m = d.member
        stop = offset + m.rows if batched else None
        body = _response(mv, d.request, outputs, offset, stop)
        result.replies.append((m.reply, encode_reply(m.corr, Code.OK, body)))
        offset += m.rows
        stats[Stat.QUEUE_NS] += max(0, start_ns - m.enqueued_ns)
        stats[Stat.SUCCESS_NS] += max(0, now_ns - m.enqueued_ns)
    t3 = time.perf_counter_ns()
    n = len(group)
    size = sum(d.member.rows for d in group) if batched else 1
    stats[Stat.SUCCESS_COUNT] += n
    stats[Stat.INFERENCE_COUNT] += size
    stats[Stat.EXECUTION_COUNT] += 1
    # Triton attributes a batch's durations to each of its requests.
    input_ns = t1 - t0 + decode_ns
    stats[Stat.COMPUTE_INPUT_NS] += input_ns * n
    stats[Stat.COMPUTE_INFER_NS] += (t2 - t1) * n
    stats[Stat.COMPUTE_OUTPUT_NS] += (t3 - t2) * n
    stats[Stat.batch(size, "count")] += 1
    stats[Stat.batch(size, "input_ns")] += input_ns
    stats[Stat.batch(size, "infer_ns")] += t2 - t1
    stats[Stat.batch(size, "output_ns")] += t3 - t2
    stats[Stat.LAST_INFERENCE_MS] = now_ns // 1_000_000
