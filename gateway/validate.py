"""Check a ModelInferRequest against the model before it is queued.

Everything a worker would trip over is rejected here with INVALID_ARGUMENT
naming the input, so a batch never fails because of one bad member.  The
result says how the request is scheduled: the rows it adds to a batch, its
priority level, its shape key and its queue timeout.

Scheduling parameters (the Open Inference Protocol's, with Triton's meaning):

* ``priority`` (int64 or uint64): 1 is the highest level, up to the model's
  ``priority_levels``; 0 or absent means ``default_priority_level``.
  Ignored, as in Triton, when the model has no priority levels.
* ``timeout`` (int64 or uint64, microseconds): the request's queue timeout.
  It applies only if the model's queue policy sets ``allow_timeout_override``,
  and then only to shorten the model's ``default_timeout_microseconds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferry import datatypes
from ferry.errors import InvalidArgument
from ferry.model_config import TensorSpec, bucket_dims
from ferry.repository import ModelVersion

# The request parameters the gateway reads; it ignores any other (the edge relies on it).
SCHEDULING_PARAMETERS = ("priority", "timeout")


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-tensor bounds beyond the model's shapes (GatewaySettings.max_tensor_elements and
    max_bytes_elements). Element counts are Python integers, so a product of dimensions never
    overflows; the limits keep what the gateway, Redis and workers must hold bounded, and the
    BYTES framing check (a Python loop per element) short."""

    max_elements: int
    max_bytes_elements: int


@dataclass(frozen=True, slots=True)
class Admission:
    rows: int
    level: int  # 0 = highest priority (Triton's level 1)
    shape: str  # requests with different keys never share a batch
    queue_timeout_us: int  # 0 = none


def _int_param(req: Any, name: str) -> int | None:
    if name not in req.parameters:
        return None
    p = req.parameters[name]
    which = p.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {name!r} must be an integer (int64_param or uint64_param), not {which}")
    value = int(getattr(p, which))
    if value < 0:
        raise InvalidArgument(f"parameter {name!r} must be >= 0, not {value}")
    return value


class RequestValidator:
    """Precomputed lookups for one model version; ``check()`` validates one request."""

    def __init__(self, mv: ModelVersion, limits: Limits) -> None:
        self.mv = mv
        self.limits = limits
        s = mv.settings
        self.label = f"model {mv.name!r} v{mv.version}"
        self.max_batch = s.max_batch_size
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in s.inputs}
        self.outputs = {t.name for t in s.outputs}
        self.expected = ", ".join(self.inputs)
        self.levels = s.priority_levels
        self.default_level = s.default_priority_level
        self.policy = s.queue_policy
        self.buckets = dict(s.shape_buckets)
        # Inputs whose non-batch dims vary: their dims make up the shape key.
        self.variable = [t for t in s.inputs if -1 in t.dims] if self.max_batch > 0 else []

    def check(self, req: Any) -> Admission:
        rows = self.rows(req)
        return Admission(rows, self._level(req), self._shape_key(req), self._queue_timeout(req))

    def _level(self, req: Any) -> int:
        priority = _int_param(req, SCHEDULING_PARAMETERS[0])
        if not self.levels:
            return 0
        if not priority:
            return self.default_level - 1
        if priority > self.levels:
            raise InvalidArgument(
                f"priority {priority} is not a level of {self.label}: it has priority_levels {self.levels} "
                "(1 is the highest; 0 means the default level)"
            )
        return priority - 1

    def _queue_timeout(self, req: Any) -> int:
        asked = _int_param(req, SCHEDULING_PARAMETERS[1])
        default = self.policy.default_timeout_us
        if not asked or not self.policy.allow_timeout_override:
            return default
        return asked if default == 0 else min(asked, default)

    def _shape_key(self, req: Any) -> str:
        if not self.variable:
            return ""
        shapes = {t.name: list(t.shape) for t in req.inputs}
        parts = []
        for spec in self.variable:
            dims = shapes[spec.name][1:]
            buckets = self.buckets.get(spec.name)
            if buckets:
                for d, want in zip(dims, spec.dims, strict=True):
                    if want == -1 and d > buckets[-1]:
                        raise InvalidArgument(
                            f"input {spec.name!r}: dimension {d} is larger than the largest shape bucket "
                            f"{buckets[-1]} of {self.label} (ferry.shape_buckets)"
                        )
                dims = list(bucket_dims(tuple(dims), spec.dims, buckets))
            parts.append(f"{spec.name}:{','.join(map(str, dims))}")
        return ";".join(parts)

    def _shape(self, spec: TensorSpec, shape: list[int]) -> tuple[int, int]:
        """(batch rows, element count) for one input's declared shape."""
        where = f"input {spec.name!r}"
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{where}: shape {shape} has a negative dimension")
        if self.max_batch > 0:
            if len(shape) != len(spec.dims) + 1:
                raise InvalidArgument(
                    f"{where}: shape {shape} must be [batch] + {list(spec.dims)} "
                    f"({len(spec.dims) + 1} dims) for {self.label}"
                )
            rows, rest = shape[0], shape[1:]
            if not 1 <= rows <= self.max_batch:
                raise InvalidArgument(
                    f"{where}: batch size {rows} must be between 1 and max_batch_size {self.max_batch}"
                )
        else:
            rows, rest = 1, shape
            if len(shape) != len(spec.dims):
                raise InvalidArgument(f"{where}: shape {shape} must have {len(spec.dims)} dims like {list(spec.dims)}")
        for got, want in zip(rest, spec.dims, strict=True):
            if want != -1 and got != want:
                expected = ([-1] if self.max_batch > 0 else []) + list(spec.dims)
                raise InvalidArgument(f"{where}: shape {shape} does not match the model's {expected}")
        count = datatypes.element_count(shape)
        most = self.limits.max_bytes_elements if spec.dtype.is_bytes else self.limits.max_elements
        if count > most:
            knob = "max_bytes_elements" if spec.dtype.is_bytes else "max_tensor_elements"
            raise InvalidArgument(f"{where}: shape {shape} has {count} elements; this gateway's limit is {most} "
                                  f"({knob}; split the request, or raise it)")
        return rows, count

    def rows(self, req: Any) -> int:
        tensors = req.inputs
        raw = req.raw_input_contents
        if raw and len(raw) != len(tensors):
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; send one per input"
            )
        seen: set[str] = set()
        batch: int | None = None
        for i, t in enumerate(tensors):
            spec = self.inputs.get(t.name)
            if spec is None:
                raise InvalidArgument(f"unexpected input {t.name!r} for {self.label} (expects: {self.expected})")
            if t.name in seen:
                raise InvalidArgument(f"input {t.name!r} is given more than once")
            seen.add(t.name)
            if t.datatype != spec.dtype.name:
                raise InvalidArgument(
                    f"input {t.name!r}: datatype {t.datatype or '(empty)'} does not match the model's {spec.dtype.name}"
                )
            rows, count = self._shape(spec, list(t.shape))
            if batch is None:
                batch = rows
            elif rows != batch:
                raise InvalidArgument(f"input {t.name!r}: batch size {rows} differs from the other inputs' {batch}")
            if raw:
                if t.HasField("contents"):
                    raise InvalidArgument(
                        f"input {t.name!r}: has typed contents although raw_input_contents is used; "
                        "use one or the other"
                    )
                self._check_raw(spec, count, raw[i])
            else:
                self._check_contents(spec, count, t)
        missing = [n for n in self.inputs if n not in seen]
        if missing:
            raise InvalidArgument(f"missing input(s) {', '.join(map(repr, missing))} for {self.label}")
        names: set[str] = set()
        for o in req.outputs:
            if o.name not in self.outputs:
                raise InvalidArgument(
                    f"requested output {o.name!r} is not an output of {self.label} (outputs: {', '.join(self.outputs)})"
                )
            if o.name in names:
                raise InvalidArgument(f"output {o.name!r} is requested more than once")
            names.add(o.name)
            if "classification" in o.parameters:
                raise InvalidArgument(f"output {o.name!r}: the classification extension is not supported")
        return batch if batch is not None else 1

    @staticmethod
    def _check_raw(spec: TensorSpec, count: int, buf: bytes) -> None:
        where = f"input {spec.name!r}"
        if spec.dtype.is_bytes:
            n = datatypes.count_bytes_elements(buf, what=where, limit=count)
            if n != count:
                raise InvalidArgument(f"{where}: raw BYTES buffer holds {n} elements; its shape needs {count}")
        elif len(buf) != count * spec.dtype.size:
            raise InvalidArgument(
                f"{where}: raw buffer is {len(buf)} bytes; shape and {spec.dtype.name} need "
                f"{count} x {spec.dtype.size} = {count * spec.dtype.size}"
            )

    @staticmethod
    def _check_contents(spec: TensorSpec, count: int, tensor: Any) -> None:
        where = f"input {spec.name!r}"
        field = spec.dtype.contents_field
        if field is None:
            raise InvalidArgument(f"{where}: {spec.dtype.name} can only be sent in raw_input_contents")
        given = [fd.name for fd, _ in tensor.contents.ListFields()]
        wrong = [g for g in given if g != field]
        if wrong:
            raise InvalidArgument(
                f"{where}: {spec.dtype.name} data belongs in contents.{field}, not {', '.join(wrong)}"
            )
        n = len(getattr(tensor.contents, field))
        if n != count:
            raise InvalidArgument(f"{where}: contents.{field} has {n} elements; its shape needs {count}")
