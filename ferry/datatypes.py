"""Open Inference Protocol tensor datatypes and their byte layouts.

One table maps each OIP datatype name to its numpy dtype, its element size,
the typed-contents field of ``InferTensorContents`` that may carry it, and the
``TYPE_*`` name used in Triton model configs.  FP16 and BF16 have no typed
field: they travel in ``raw_input_contents`` only.  BYTES elements are
serialised as a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.errors import InvalidArgument

# numpy has no bfloat16: BF16 tensors are carried as raw uint16 bit patterns.
_BF16_STORAGE = np.dtype("<u2")


@dataclass(frozen=True, slots=True)
class DataType:
    name: str
    numpy: np.dtype[Any]
    size: int  # bytes per element; 0 for BYTES (variable)
    contents_field: str | None  # InferTensorContents field, None = raw only
    config_name: str  # model_config.proto DataType name

    @property
    def is_bytes(self) -> bool:
        return self.size == 0


_TABLE = [
    DataType("BOOL", np.dtype(np.bool_), 1, "bool_contents", "TYPE_BOOL"),
    DataType("UINT8", np.dtype("<u1"), 1, "uint_contents", "TYPE_UINT8"),
    DataType("UINT16", np.dtype("<u2"), 2, "uint_contents", "TYPE_UINT16"),
    DataType("UINT32", np.dtype("<u4"), 4, "uint_contents", "TYPE_UINT32"),
    DataType("UINT64", np.dtype("<u8"), 8, "uint64_contents", "TYPE_UINT64"),
    DataType("INT8", np.dtype("<i1"), 1, "int_contents", "TYPE_INT8"),
    DataType("INT16", np.dtype("<i2"), 2, "int_contents", "TYPE_INT16"),
    DataType("INT32", np.dtype("<i4"), 4, "int_contents", "TYPE_INT32"),
    DataType("INT64", np.dtype("<i8"), 8, "int64_contents", "TYPE_INT64"),
    DataType("FP16", np.dtype("<f2"), 2, None, "TYPE_FP16"),
    DataType("BF16", _BF16_STORAGE, 2, None, "TYPE_BF16"),
    DataType("FP32", np.dtype("<f4"), 4, "fp32_contents", "TYPE_FP32"),
    DataType("FP64", np.dtype("<f8"), 8, "fp64_contents", "TYPE_FP64"),
    DataType("BYTES", np.dtype(np.object_), 0, "bytes_contents", "TYPE_STRING"),
]

BY_NAME: dict[str, DataType] = {d.name: d for d in _TABLE}
BY_CONFIG_NAME: dict[str, DataType] = {d.config_name: d for d in _TABLE}

# ONNX TensorProto.DataType numbers -> OIP names (onnx.TensorProto enum values).
ONNX_TO_OIP: dict[int, str] = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16",
}

_LEN = struct.Struct("<I")


def lookup(name: str, *, what: str) -> DataType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidArgument(
            f"{what}: unknown datatype {name!r}; expected one of {', '.join(BY_NAME)}"
        ) from None


def element_count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_bytes_elements(raw: bytes | memoryview, *, what: str, limit: int | None = None) -> int:
    """Number of length-prefixed elements in a BYTES raw buffer (validating framing).

    With ``limit``, stops as soon as there are more than that many (and returns limit + 1): a
    buffer of millions of empty elements must not cost millions of loop turns when the shape
    already says how many there should be."""
    view = memoryview(raw)
    pos, n, end = 0, 0, len(view)
    while pos < end:
        if limit is not None and n > limit:
            return n
        if pos + 4 > end:
            raise InvalidArgument(f"{what}: truncated BYTES element length at offset {pos}")
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4 + length
        if pos > end:
            raise InvalidArgument(
                f"{what}: BYTES element {n} declares {length} bytes but the buffer ends early"
            )
        n += 1
    return n


def decode_raw(dtype: DataType, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray[Any, Any]:
    """View raw OIP bytes as an array; zero-copy for fixed-size types."""
    if dtype.is_bytes:
        items: list[bytes] = []
        view = memoryview(raw)
        pos = 0
        while pos < len(view):
            (length,) = _LEN.unpack_from(view, pos)
            items.append(bytes(view[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        arr = np.empty(len(items), dtype=np.object_)
        arr[:] = items
        return arr.reshape(shape)
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)


def decode_contents(dtype: DataType, shape: Sequence[int], values: Sequence[Any]) -> np.ndarray[Any, Any]:
    """Build an array from a typed InferTensorContents field."""
    if dtype.is_bytes:
        arr = np.empty(len(values), dtype=np.object_)
        arr[:] = list(values)
        return arr.reshape(shape)
    return np.asarray(values, dtype=dtype.numpy).reshape(shape)


def encode_raw(dtype: DataType, array: np.ndarray[Any, Any]) -> bytes:
    """Serialise an array in OIP raw layout."""
    if dtype.is_bytes:
        parts: list[bytes] = []
        for item in array.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=dtype.numpy).tobytes()
