"""The contract between the worker loop and a hardware runtime.

A runtime owns one loaded model version and runs one batch at a time:
inputs are numpy arrays keyed by tensor name (already concatenated along the
batch dimension), outputs come back the same way.  Runtimes are synchronous
and are called from a worker thread; they must release the GIL while the
model executes (onnxruntime does).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ferry.repository import ModelVersion
from ferry.settings import WorkerSettings

Arrays = dict[str, np.ndarray[Any, Any]]


class Runtime(Protocol):
    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays: ...


def load_runtime(settings: WorkerSettings, mv: ModelVersion) -> Runtime:
    """Build the runtime for this worker's pool."""
    if settings.pool == "cpu":
        from workers.onnx_cpu import OnnxCpuRuntime

        return OnnxCpuRuntime(mv, intra_op_threads=settings.intra_op_threads)
    raise NotImplementedError(f"pool {settings.pool!r} has no runtime yet")
