"""MLServer custom runtime for the benchmark peer: one onnxruntime session, one model call per batch.

Runs inside MLServer's own venv (benchmarks/peers/mlserver.py copies it into the model repository and names it
as the model's `implementation`), so it imports mlserver and onnxruntime, not Ferry.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):  # type: ignore[misc]  # mlserver ships no type information
    """Serves one ONNX file with onnxruntime's CPU provider, one input and one output tensor.

    With adaptive batching on, MLServer merges the queued requests into one InferenceRequest (concatenated along
    the first dimension) before calling predict(), and splits the response back, so each predict() is one model
    call for the whole batch.
    """

    async def load(self) -> bool:
        opts = ort.SessionOptions()
        # The same threading as every other peer: one model instance that uses one core for its maths.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        # Run on the event loop, as MLServer's runtimes do (mlserver-sklearn, mlserver-xgboost, and the ONNX one on
        # its main branch); with parallel_workers=0 that also makes this the one model instance, one batch at a time.
        # A one-thread executor (so that the loop reads requests while the model runs) was not faster: MLServer's
        # per-request Python work, not the model, bounds throughput here; at concurrency 8, interleaved runs gave
        # 1270 and 1250 infer/s on the loop, 980 and 1060 with the executor.
        (y,) = self._session.run([self._output], {self._input: x})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name=self._output, payload=y)],
        )
