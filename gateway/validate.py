"""Check a ModelInferRequest against the model before it is queued.

Everything a worker would trip over is rejected here with INVALID_ARGUMENT
naming the input, so a batch never fails because of one bad member.  The
result is the number of rows the request adds to a batch.
"""

from __future__ import annotations

from typing import Any

from ferry import datatypes
from ferry.errors import InvalidArgument
from ferry.model_config import TensorSpec
from ferry.repository import ModelVersion

# Largest element count of one tensor; far above any real model's, low enough
# that size arithmetic can never overflow a 64-bit length downstream.
MAX_ELEMENTS = 1 << 40


class RequestValidator:
    """Precomputed lookups for one model version; ``rows()`` validates one request."""

    def __init__(self, mv: ModelVersion) -> None:
        self.mv = mv
        s = mv.settings
        self.label = f"model {mv.name!r} v{mv.version}"
        self.max_batch = s.max_batch_size
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in s.inputs}
        self.outputs = {t.name for t in s.outputs}
        self.expected = ", ".join(self.inputs)

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
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"{where}: shape {shape} has {count} elements; the limit is {MAX_ELEMENTS}")
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
            n = datatypes.count_bytes_elements(buf, what=where)
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
