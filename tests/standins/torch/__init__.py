"""STAND-IN for tests only — not the real library; verifies Ferry's adapter contract, not Neuron behaviour.

The few names of PyTorch's API that Ferry's Neuron adapter and compile script
use, over numpy: ``Tensor`` (``numpy()``, ``detach()``, ``cpu()``, ``shape``,
``dtype``), ``from_numpy``, ``as_tensor``, ``zeros``, ``no_grad``,
``is_grad_enabled``, dtypes, and the ``jit`` and ``nn`` submodules.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Real torch dtypes are torch.dtype objects; numpy dtypes are enough for the contract.
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
int8 = np.dtype(np.int8)
int16 = np.dtype(np.int16)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
uint8 = np.dtype(np.uint8)
bool = np.dtype(np.bool_)

_grad_enabled = True


class Tensor:
    """A numpy array in a wrapper, so that code cannot mistake one for the other."""

    def __init__(self, array: np.ndarray[Any, Any]) -> None:
        self._array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._array.dtype

    def numpy(self) -> np.ndarray[Any, Any]:
        return self._array

    def detach(self) -> Tensor:
        return self

    def cpu(self) -> Tensor:
        return self


def from_numpy(array: np.ndarray[Any, Any]) -> Tensor:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected np.ndarray (got {type(array).__name__})")
    if array.dtype == np.object_:
        raise TypeError("can't convert np.ndarray of type numpy.object_")
    return Tensor(array)  # shares memory, as the real one does


def as_tensor(data: Any, dtype: np.dtype[Any] | None = None) -> Tensor:
    return Tensor(np.asarray(data, dtype=dtype))


def zeros(*size: Any, dtype: np.dtype[Any] | None = None) -> Tensor:
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
    return Tensor(np.zeros(shape, dtype=dtype or float32))


def is_grad_enabled() -> bool:
    return _grad_enabled


class no_grad:
    def __enter__(self) -> None:
        global _grad_enabled
        self._prev = _grad_enabled
        _grad_enabled = False

    def __exit__(self, *exc: object) -> None:
        global _grad_enabled
        _grad_enabled = self._prev


# Submodules use Tensor, defined above.
from torch import jit, nn  # noqa: E402

__all__ = ["Tensor", "as_tensor", "from_numpy", "is_grad_enabled", "jit", "nn", "no_grad", "zeros"]
