"""Reference point for the benchmarks: a plain grpc.aio OIP server, no Redis, no batching.

It serves the example MLP in-process with onnxruntime, one request per model
call, exactly what "a plain grpc.aio server" means in docs/benchmarks.md.
``--canned`` skips the model and returns a fixed response, which isolates
the cost of grpc.aio itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ferry.example_model import write_repository
from ferry.repository import load_repository
from protos import grpc_service_pb2 as pb


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--canned", action="store_true")
    args = ap.parse_args()
    repo = load_repository(write_repository(Path(tempfile.mkdtemp()) / "models"))
    mv = repo.get("mlp")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(mv.model_file), opts, providers=["CPUExecutionProvider"])
    canned = pb.ModelInferResponse(model_name="mlp", model_version="1")
    canned.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 10])
    canned.raw_output_contents.append(bytes(40))
    canned_bytes = canned.SerializeToString()

    async def infer(raw: bytes, ctx: Any) -> bytes:
        if args.canned:
            return canned_bytes
        req = pb.ModelInferRequest.FromString(raw)
        x = np.frombuffer(req.raw_input_contents[0], dtype=np.float32).reshape(tuple(req.inputs[0].shape))
        (y,) = sess.run(["OUTPUT0"], {"INPUT0": x})
        resp = pb.ModelInferResponse(model_name="mlp", model_version="1", id=req.id)
        resp.outputs.add(name="OUTPUT0", datatype="FP32", shape=y.shape)
        resp.raw_output_contents.append(y.tobytes())
        return bytes(resp.SerializeToString())

    s = mv.settings
    meta = pb.ModelMetadataResponse(name="mlp", versions=["1"], platform="onnxruntime_onnx")
    meta.inputs.add(name="INPUT0", datatype="FP32", shape=[-1, 256])
    meta.outputs.add(name="OUTPUT0", datatype="FP32", shape=[-1, 10])

    async def metadata(req: Any, ctx: Any) -> Any:
        return meta

    async def config(req: Any, ctx: Any) -> Any:
        return pb.ModelConfigResponse(config=s.config)

    async def server_md(req: Any, ctx: Any) -> Any:
        return pb.ServerMetadataResponse(name="plain", version="0")

    async def stats(req: Any, ctx: Any) -> Any:
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name="mlp", version="1")])

    async def ready(req: Any, ctx: Any) -> Any:
        return pb.ModelReadyResponse(ready=req.name == "mlp")

    def h(fn: Any, req: Any, resp: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ModelReady": h(ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ModelMetadata": h(metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": h(config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ServerMetadata": h(server_md, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelStatistics": h(stats, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
    }
    server = grpc.aio.server(options=[("grpc.optimization_target", os.environ.get("OPT", "blend"))])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
