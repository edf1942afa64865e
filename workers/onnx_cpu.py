"""CPU runtime: onnxruntime's CPUExecutionProvider."""

from __future__ import annotations

import onnxruntime as ort

from ferry.errors import ConfigError
from ferry.repository import ModelVersion
from workers.runtime import Arrays


class OnnxCpuRuntime:
    def __init__(self, mv: ModelVersion, *, intra_op_threads: int) -> None:
        opts = ort.SessionOptions()
        # Several workers may share a host: one inter-op thread and an explicit
        # intra-op count keep them from oversubscribing the cores.
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(mv.model_file), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"{mv.model_file}: onnxruntime cannot load it: {exc}") from None

    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays:
        values = self.session.run(output_names, inputs)
        return dict(zip(output_names, values, strict=True))
