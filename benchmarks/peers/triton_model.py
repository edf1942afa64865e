"""Triton python-backend model for the benchmark peer in ``triton.py``: the example MLP in onnxruntime.

benchmarks/peers/triton.py copies this file to ``<workdir>/models/mlp/1/model.py``. It runs inside
Triton's ``triton_python_backend_stub`` process, where ``triton_python_backend_utils`` is importable
(it sits in the backend directory), not in Ferry's own interpreter.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the python backend at run time

INPUT, OUTPUT = "INPUT0", "OUTPUT0"


class TritonPythonModel:
    """One onnxruntime session; each execute() call runs the whole dynamic batch in one session.run()."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        # The ONNX file path comes from config.pbtxt's parameters, so the repository needs no copy of it.
        onnx_path = config["parameters"]["onnx_path"]["string_value"]
        opts = ort.SessionOptions()
        # Same model-side budget as every other peer: one thread, one instance.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        # Triton's dynamic batcher hands over up to max_batch_size requests at once; the python backend
        # does not merge them itself, so concatenate here to get one model call per batch.
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        out = self.session.run([OUTPUT], {INPUT: batch})[0]
        responses = []
        start = 0
        for a in arrays:
            rows = a.shape[0]
            # Row slices of a C-contiguous array are contiguous: no copy needed before handing them back.
            tensor = pb_utils.Tensor(OUTPUT, out[start : start + rows])
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += rows
        return responses

    def finalize(self) -> None:
        self.session = None
