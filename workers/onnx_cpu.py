"""CPU runtime: onnxruntime's CPUExecutionProvider."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from ferry.errors import ConfigError, InvalidArgument
from ferry.repository import ModelVersion
from workers.runtime import Arrays


class OnnxCpuRuntime:
    devices = ["cpu"]

    def __init__(self, mv: ModelVersion, *, intra_op_threads: int, inter_op_threads: int = 1) -> None:
        bf16 = [t.name for t in (*mv.settings.inputs, *mv.settings.outputs) if t.dtype.name == "BF16"]
        if bf16:
            # The protocol carries BF16 (raw only), but onnxruntime's Python API has no
            # numpy type for it: outputs cannot be read back. Refuse at load, not per call.
            raise ConfigError(f"{mv.model_file}: tensors {bf16} are BF16, which the onnxruntime CPU pool cannot serve")
        opts = ort.SessionOptions()
        # Several workers may share a host: explicit thread counts (one each by default)
        # keep them from oversubscribing the cores.
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(mv.model_file), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"{mv.model_file}: onnxruntime cannot load it: {exc}") from None

    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays:
        feeds = {name: _text(name, arr) if arr.dtype == np.object_ else arr for name, arr in inputs.items()}
        values = self.session.run(output_names, feeds)
        return dict(zip(output_names, values, strict=True))


def _text(name: str, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """ONNX string tensors hold text: onnxruntime's Python binding takes ``str``
    elements (a ``bytes`` element would be stringified as ``"b'...'"``), so
    BYTES elements must be UTF-8."""
    out = np.empty(arr.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, item in enumerate(arr.reshape(-1)):
        try:
            flat[i] = item.decode("utf-8") if isinstance(item, bytes) else item
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"input {name!r}: element {i} is not UTF-8; ONNX string tensors can only carry text"
            ) from None
    return out
