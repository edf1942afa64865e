"""Ferry's side of tests/test_proto_wire_compat.py, run as a subprocess.

This process imports Ferry's generated ``protos`` and never ``tritonclient.grpc``
(the two register the same ``inference.*`` symbols in protobuf's default pool).

Commands (results on stdout):

* ``export``: a serialized ``FileDescriptorSet`` of our files, dependencies first,
  taken from the generated modules' ``DESCRIPTOR``s;
* ``check``:  JSON ``{check name: null | traceback}`` for the text-format checks;
* ``encode``: JSON with the wire bytes (base64) and text format of messages built
  with our generated classes, for the Triton side to decode;
* ``serve``:  a gRPC server built only from our generated stubs; prints
  ``port N`` and runs until stdin is closed (or ``SERVE_MAX_S`` elapses).
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import grpc
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.message import Message
from proto_samples import (
    ROUND_TRIP_SAMPLES,
    SAMPLE_CONFIG_PBTXT,
    SAMPLE_ENSEMBLE_PBTXT,
    SAMPLE_NEWER_FIELDS_PBTXT,
    SAMPLE_SEQUENCE_PBTXT,
)

from protos import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

SERVE_MAX_S = 120.0


def export() -> None:
    out = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, grpc_service_pb2):
        module.DESCRIPTOR.CopyToProto(out.file.add())
    sys.stdout.buffer.write(out.SerializeToString())


# --------------------------------------------------------------------------
# check


def check_parse_triton_config_pbtxt() -> None:
    config = text_format.Parse(SAMPLE_CONFIG_PBTXT, model_config_pb2.ModelConfig())
    assert config.name == "densenet_onnx"
    assert config.max_batch_size == 8
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2
    assert list(config.input[0].dims) == [3, 224, 224]
    assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert config.input[1].data_type == model_config_pb2.TYPE_BOOL
    assert config.input[1].optional
    assert config.output[0].label_filename == "densenet_labels.txt"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.instance_group[0].gpus) == [0, 1]
    assert getattr(config.instance_group[0].rate_limiter.resources[1], "global")
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 100
    assert batching.default_queue_policy.timeout_action == model_config_pb2.ModelQueuePolicy.DELAY
    assert batching.priority_queue_policy[2].max_queue_size == 4
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.parameters["precision_mode"] == "FP16"
    assert config.parameters["intra_op_thread_count"].string_value == "4"
    assert config.model_warmup[0].inputs["data_0"].zero_data
    assert config.response_cache.enable

    ensemble = text_format.Parse(SAMPLE_ENSEMBLE_PBTXT, model_config_pb2.ModelConfig())
    assert ensemble.WhichOneof("scheduling_choice") == "ensemble_scheduling"
    assert ensemble.ensemble_scheduling.step[0].model_version == -1
    assert ensemble.input[0].data_type == model_config_pb2.TYPE_STRING

    sequence = text_format.Parse(SAMPLE_SEQUENCE_PBTXT, model_config_pb2.ModelConfig())
    assert sequence.WhichOneof("scheduling_choice") == "sequence_batching"
    assert sequence.sequence_batching.WhichOneof("strategy_choice") == "oldest"
    assert sequence.sequence_batching.state[0].initial_state[0].zero_data


def check_newer_triton_config_fields_parse() -> None:
    config = text_format.Parse(SAMPLE_NEWER_FIELDS_PBTXT, model_config_pb2.ModelConfig())
    assert config.runtime == "model.py"
    assert config.input[0].data_type == model_config_pb2.TYPE_BF16
    assert config.input[0].is_non_linear_format_io
    metric = config.model_metrics.metric_control[0]
    assert metric.metric_identifier.family == "nv_inference_first_response_histogram_ms"
    assert list(metric.histogram_options.buckets) == [1, 2, 4, 8]


def check_unknown_config_field_is_rejected() -> None:
    try:
        text_format.Parse('name: "m" no_such_field: 1', model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        assert "no_such_field" in str(exc), exc
    else:
        raise AssertionError("an unknown field was accepted")


CHECKS: dict[str, Callable[[], None]] = {
    "parse_triton_config_pbtxt": check_parse_triton_config_pbtxt,
    "newer_triton_config_fields_parse": check_newer_triton_config_fields_parse,
    "unknown_config_field_is_rejected": check_unknown_config_field_is_rejected,
}


def check() -> None:
    results: dict[str, str | None] = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    json.dump(results, sys.stdout)


# --------------------------------------------------------------------------
# encode


def _encoded(message: Message) -> dict[str, str]:
    return {
        "type": message.DESCRIPTOR.full_name,
        "wire": base64.b64encode(message.SerializeToString(deterministic=True)).decode(),
        "text": text_format.MessageToString(message),
    }


def _infer_request() -> grpc_service_pb2.ModelInferRequest:
    request = grpc_service_pb2.ModelInferRequest(model_name="simple", model_version="1", id="req-1")
    request.parameters["sequence_id"].uint64_param = 2**63 + 5
    request.parameters["priority"].int64_param = -3
    request.parameters["flag"].bool_param = True
    request.parameters["temperature"].double_param = 0.25
    request.parameters["tag"].string_param = "x"
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "none"
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    request.inputs.add(name="INPUT1", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\x00abc")
    request.outputs.add(name="OUTPUT0").parameters["binary_data"].bool_param = True
    request.raw_input_contents.append(b"\x01\x02\x03\x04")
    return request


def _stream_response() -> grpc_service_pb2.ModelStreamInferResponse:
    response = grpc_service_pb2.ModelStreamInferResponse(error_message="")
    out = response.infer_response.outputs.add(name="OUTPUT0", datatype="INT64", shape=[2])
    out.contents.int64_contents.extend([-1, 1])
    response.infer_response.raw_output_contents.append(b"\xff" * 8)
    return response


def encode() -> None:
    configs = {}
    for name, pbtxt in ROUND_TRIP_SAMPLES.items():
        config = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
        configs[name] = {
            "config": _encoded(config),
            "response": _encoded(grpc_service_pb2.ModelConfigResponse(config=config)),
        }
    messages = {"infer_request": _encoded(_infer_request()), "stream_response": _encoded(_stream_response())}
    json.dump({"configs": configs, "messages": messages}, sys.stdout)


# --------------------------------------------------------------------------
# serve


class EchoServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Minimal servicer built only from our generated code."""

    def ServerLive(
        self, request: grpc_service_pb2.ServerLiveRequest, context: grpc.ServicerContext
    ) -> grpc_service_pb2.ServerLiveResponse:
        return grpc_service_pb2.ServerLiveResponse(live=True)

    def ModelConfig(
        self, request: grpc_service_pb2.ModelConfigRequest, context: grpc.ServicerContext
    ) -> grpc_service_pb2.ModelConfigResponse:
        config = model_config_pb2.ModelConfig(name=request.name, max_batch_size=4)
        config.input.add(name="x", data_type=model_config_pb2.TYPE_FP32, dims=[2])
        return grpc_service_pb2.ModelConfigResponse(config=config)

    def ModelInfer(
        self, request: grpc_service_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> grpc_service_pb2.ModelInferResponse:
        response = grpc_service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.parameters["echo_k"].CopyFrom(request.parameters["k"])
        first = request.inputs[0]
        response.outputs.add(name="y", datatype=first.datatype, shape=first.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response

    def ModelStreamInfer(
        self,
        request_iterator: Iterator[grpc_service_pb2.ModelInferRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[grpc_service_pb2.ModelStreamInferResponse]:
        for request in request_iterator:
            yield grpc_service_pb2.ModelStreamInferResponse(infer_response=self.ModelInfer(request, context))


def serve() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # mypy-protobuf marks every RPC abstract; the ones not overridden are never called.
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    # Wait for the test to close our stdin, in a thread so that a stuck test cannot keep us forever.
    reader = threading.Thread(target=sys.stdin.read, daemon=True)
    reader.start()
    reader.join(SERVE_MAX_S)
    server.stop(grace=None).wait(5)


COMMANDS: dict[str, Callable[[], None]] = {"export": export, "check": check, "encode": encode, "serve": serve}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}}")
    COMMANDS[sys.argv[1]]()
