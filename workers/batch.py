"""Run one batch: decode members, pad, join inputs, one model call, split, encode replies.

Members whose non-batch dimensions differ cannot share a tensor, so they run
as separate sub-batches (the broker already keeps different shape keys
apart; this is the worker's own guarantee).  With ``ferry.shape_buckets``
each bucketed input's variable dimensions are first padded with zeros (empty
strings for BYTES) up to the bucket size, so members of one bucket share a
batch; outputs keep the padded length.  With ``ferry.batch_sizes`` (a model
compiled for fixed batch sizes) the batch is padded with zero rows up to the
smallest compiled size and the padding rows are cut from the outputs.

A member whose deadline passed while it was queued is answered
DEADLINE_EXCEEDED without running; one that fails to decode gets its own
error reply; the rest of the batch still runs.  A model execution error
fails that (sub-)batch's members with INTERNAL and nothing else.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.messages import Member, Stat, encode_reply, reply_head
from ferry import datatypes
from ferry.errors import Code, FerryError, Internal
from ferry.model_config import bucket_dims
from ferry.repository import ModelVersion
from workers.codec import BodyPieces, Decoded, Decoder, ResponseEncoder, input_array, join_inputs
from workers.runtime import Runtime

log = logging.getLogger("ferry.worker")

PIECES_MAX = 256  # kinds of reply remembered per output dims (request ids are part of the kind)


@dataclass(slots=True)
class BatchResult:
    replies: list[tuple[str, bytes]] = field(default_factory=list)  # (gateway id, encoded reply)
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rows_run: int = 0  # rows the model computed, padding included


def _fail(result: BatchResult, m: Member, code: int, message: str, now_ns: int) -> None:
    result.replies.append((m.gateway, encode_reply(m.corr, code, message.encode())))
    result.stats[Stat.FAIL_COUNT] += 1
    result.stats[Stat.FAIL_NS] += max(0, now_ns - m.enqueued_ns)


class BatchRunner:
    """Everything needed to run batches of one model version, prepared once."""

    def __init__(self, mv: ModelVersion, runtime: Runtime) -> None:
        self.mv = mv
        self.runtime = runtime
        self.batched = mv.settings.max_batch_size > 0
        self.specs = {t.name: t for t in mv.settings.inputs}
        self.decoder = Decoder(self.specs)
        self.encoder = ResponseEncoder(mv)
        # outputs' non-batch dims -> (request id, requested outputs, rows) -> a reply's fixed bytes
        self._pieces: dict[tuple[tuple[str, tuple[int, ...]], ...],
                           dict[tuple[str, tuple[str, ...], int], BodyPieces]] = {}
        self.buckets = dict(mv.settings.shape_buckets)
        self.static_sizes = tuple(sorted(mv.settings.static_batch_sizes))

    def _padded_shapes(self, d: Decoded) -> dict[str, tuple[int, ...]]:
        """Each input's non-batch dims after bucketing: what members must agree on to share a tensor."""
        out = {}
        for name, spec in self.specs.items():
            dims = d.shapes[name][1:] if self.batched else d.shapes[name]
            buckets = self.buckets.get(name)
            out[name] = bucket_dims(dims, spec.dims, buckets) if buckets else dims
        return out

    def run(self, members: Sequence[Member]) -> BatchResult:
        result = BatchResult()
        start_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        groups: dict[tuple[Any, ...], list[tuple[Member, Decoded]]] = defaultdict(list)
        # Requests decoded from one remembered layout share its shapes dict: their signature is
        # worked out once (the dicts stay alive until the batch ends, so their ids cannot repeat).
        sigs: dict[int, tuple[Any, ...]] = {}
        for m in members:
            if m.deadline_ns and m.deadline_ns < start_ns:
                # Its client has given up already: running it would only delay the others.
                late = (start_ns - m.deadline_ns) / 1e6
                _fail(result, m, Code.DEADLINE_EXCEEDED,
                      f"model {self.mv.name!r} v{self.mv.version}: deadline passed {late:.1f} ms before "
                      "a worker could run the request", start_ns)
                continue
            try:
                d = self.decoder.decode(m.payload)
            except Exception as exc:  # a malformed payload must not take the worker down
                err = exc if isinstance(exc, FerryError) else None
                _fail(result, m, err.code if err else Code.INVALID_ARGUMENT,
                      err.message if err else f"cannot decode request: {exc}", time.time_ns())
                continue
            # Only members whose (padded) non-batch dims agree can share a tensor.
            if self.batched:
                sig = sigs.get(id(d.shapes))
                if sig is None:
                    sig = sigs[id(d.shapes)] = tuple(self._padded_shapes(d).values())
            else:
                sig = (id(d),)
            groups[sig].append((m, d))
        decode_ns = time.perf_counter_ns() - t0
        for group in groups.values():
            self._run_group(group, result, start_ns, decode_ns)
        return result

    def _inputs(self, decoded: list[Decoded], rows: int) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
        """The batch's input tensors (bucket- and batch-padded) and the rows the model will compute."""
        target = rows
        if self.static_sizes:
            target = next((s for s in self.static_sizes if s >= rows), rows)
        inputs = {}
        pad_to = self._padded_shapes(decoded[0]) if self.buckets else None
        for name, spec in self.specs.items():
            if pad_to is not None and name in self.buckets:
                arrays = [_pad(input_array(spec, d), pad_to[name], self.batched) for d in decoded]
                arr = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            else:
                arr = join_inputs(spec, decoded, rows)
            if target > rows:
                fill = np.full((target - rows, *arr.shape[1:]), b"" if spec.dtype.is_bytes else 0, dtype=arr.dtype)
                arr = np.concatenate([arr, fill])
            inputs[name] = arr
        return inputs, target

    def _run_group(
        self, group: list[tuple[Member, Decoded]], result: BatchResult, start_ns: int, decode_ns: int
    ) -> None:
        stats = result.stats
        mv = self.mv
        decoded = [d for _, d in group]
        rows = sum(m.rows for m, _ in group)
        t0 = time.perf_counter_ns()
        try:
            inputs, computed = self._inputs(decoded, rows) if self.batched else (
                {name: join_inputs(spec, decoded, rows) for name, spec in self.specs.items()}, rows)
            t1 = time.perf_counter_ns()
            output_names = self.encoder.all_outputs
            outputs = self.runtime.run(inputs, list(output_names))
            if self.batched and any(outputs[n].shape[:1] != (computed,) for n in output_names):
                raise Internal(f"model returned outputs whose first dimension is not the batch size {computed}")
            if computed > rows:
                outputs = {n: outputs[n][:rows] for n in output_names}  # cut the padding rows
            result.rows_run += computed
        except Exception as exc:
            code = exc.code if isinstance(exc, FerryError) else Code.INTERNAL
            message = exc.message if isinstance(exc, FerryError) else f"model execution failed: {exc}"
            log.warning("model %s v%d failed a batch of %d: %s", mv.name, mv.version, len(group), message)
            now_ns = time.time_ns()
            for m, _ in group:
                result.replies.append((m.gateway, encode_reply(m.corr, code, message.encode())))
                stats[Stat.FAIL_NS] += max(0, now_ns - m.enqueued_ns)
            stats[Stat.FAIL_COUNT] += len(group)
            return
        t2 = time.perf_counter_ns()
        # Fixed-size outputs are serialised once; members take byte slices of them.
        flat: dict[str, tuple[bytes, int, tuple[int, ...]] | None] = {}
        for name in output_names:
            arr = outputs[name]
            dtype = self.encoder.outputs[name].dtype
            if self.batched and not dtype.is_bytes:
                row_bytes = dtype.size * datatypes.element_count(arr.shape[1:])
                flat[name] = (datatypes.encode_raw(dtype, arr), row_bytes, tuple(arr.shape[1:]))
            else:
                flat[name] = None
        offset = 0
        now_ns = time.time_ns()
        queue_ns = success_ns = 0
        replies = result.replies
        # The common case: every output has fixed-size rows, and each reply is its kind's pieces
        # around slices of the outputs. Kinds are kept per outputs' non-batch dims (variable-size
        # models), looked up once a group, so that a member's key stays a flat tuple.
        fixed = {n: f for n, f in flat.items() if f is not None}
        kinds: dict[tuple[str, tuple[str, ...], int], BodyPieces] | None = None
        if len(fixed) == len(flat):
            dims = tuple((n, f[2]) for n, f in fixed.items())
            if (kinds := self._pieces.get(dims)) is None:
                if len(self._pieces) >= PIECES_MAX:
                    self._pieces.clear()
                kinds = self._pieces[dims] = {}
        for m, d in group:
            names = d.requested or output_names
            if kinds is not None:
                key = (d.request_id, names, m.rows)
                pieces = kinds.get(key)
                if pieces is None:
                    pieces = self.encoder.pieces(d.request_id, [
                        (name, (m.rows, *fixed[name][2]), m.rows * fixed[name][1]) for name in names])
                    if len(kinds) < PIECES_MAX:
                        kinds[key] = pieces
                parts = [reply_head(m.corr, Code.OK, pieces.size)]
                if not names:  # a model without outputs: the body is its one piece
                    parts.append(pieces.before[0])
                for name, before in zip(names, pieces.before, strict=False):
                    data, row_bytes, _ = fixed[name]
                    parts += (before, data[offset * row_bytes : (offset + m.rows) * row_bytes])
                replies.append((m.gateway, b"".join(parts)))
            else:
                tensors = []
                for name in names:
                    f = flat[name]
                    if f is not None:
                        data, row_bytes, rest = f
                        chunk = data[offset * row_bytes : (offset + m.rows) * row_bytes]
                        tensors.append((name, (m.rows, *rest), chunk))
                    else:
                        arr = outputs[name][offset : offset + m.rows] if self.batched else outputs[name]
                        dtype = self.encoder.outputs[name].dtype
                        tensors.append((name, tuple(arr.shape), datatypes.encode_raw(dtype, arr)))
                replies.append((m.gateway, encode_reply(m.corr, Code.OK, self.encoder.encode(d.request_id, tensors))))
            offset += m.rows
            queue_ns += max(0, start_ns - m.enqueued_ns)
            success_ns += max(0, now_ns - m.enqueued_ns)
        stats[Stat.QUEUE_NS] += queue_ns
        stats[Stat.SUCCESS_NS] += success_ns
        t3 = time.perf_counter_ns()
        n = len(group)
        size = computed if self.batched else 1
        input_ns = t1 - t0 + decode_ns
        stats[Stat.SUCCESS_COUNT] += n
        stats[Stat.INFERENCE_COUNT] += size
        stats[Stat.EXECUTION_COUNT] += 1
        # Triton attributes a batch's durations to each of its requests.
        stats[Stat.COMPUTE_INPUT_NS] += input_ns * n
        stats[Stat.COMPUTE_INFER_NS] += (t2 - t1) * n
        stats[Stat.COMPUTE_OUTPUT_NS] += (t3 - t2) * n
        count_f, input_f, infer_f, output_f = Stat.batch_fields(size)
        stats[count_f] += 1
        stats[input_f] += input_ns
        stats[infer_f] += t2 - t1
        stats[output_f] += t3 - t2
        stats[Stat.LAST_INFERENCE_MS] = now_ns // 1_000_000


def _pad(arr: np.ndarray[Any, Any], dims: tuple[int, ...], batched: bool) -> np.ndarray[Any, Any]:
    """Zero-pad (empty strings for BYTES) the non-batch dims of one member's input up to ``dims``."""
    have = arr.shape[1:] if batched else arr.shape
    if have == dims:
        return arr
    widths = ([(0, 0)] if batched else []) + [(0, want - got) for got, want in zip(have, dims, strict=True)]
    if arr.dtype == object:
        return np.pad(arr, widths, constant_values=b"")
    return np.pad(arr, widths)
