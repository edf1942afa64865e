"""The contract between the worker loop and a hardware runtime.

A runtime owns one loaded model version and runs one batch at a time:
inputs are numpy arrays keyed by tensor name (already concatenated along the
batch dimension, and padded to a compiled size where the model has
``ferry.batch_sizes``), outputs come back the same way.  Runtimes are
synchronous and are called from the worker's event loop or its compute thread;
they must release the GIL while the model executes (onnxruntime and torch do).

``devices`` names what the runtime computes on (``cpu``, ``cuda:0``,
``neuroncore:2``...); the worker publishes it in its registration.

Runtimes by ``WorkerSettings.runtime``:

    onnx-cpu   workers/onnx_cpu.py   onnxruntime, CPUExecutionProvider
    onnx-gpu   workers/onnx_gpu.py   onnxruntime-gpu: CUDA (and TensorRT) providers
    neuron     workers/neuron.py     torch-neuronx: a TorchScript model compiled for Inferentia/Trainium

Each module imports its hardware library only when its runtime is built, so a
worker image carries only the library of its own pool.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ferry.repository import ModelVersion
from ferry.settings import WorkerSettings

Arrays = dict[str, np.ndarray[Any, Any]]


class Runtime(Protocol):
    devices: list[str]

    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays: ...


def load_runtime(settings: WorkerSettings, mv: ModelVersion) -> Runtime:
    """Build the runtime this worker's settings name for one model version."""
    if settings.runtime == "onnx-cpu":
        from workers.onnx_cpu import OnnxCpuRuntime

        return OnnxCpuRuntime(mv, intra_op_threads=settings.intra_op_threads,
                              inter_op_threads=settings.inter_op_threads)
    if settings.runtime == "onnx-gpu":
        from workers.onnx_gpu import OnnxGpuRuntime

        return OnnxGpuRuntime(mv, settings)
    if settings.runtime == "neuron":
        from workers.neuron import NeuronRuntime

        return NeuronRuntime(mv, settings)
    raise AssertionError(f"settings validated runtime {settings.runtime!r}")
