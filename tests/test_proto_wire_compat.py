"""Wire-compatibility of Ferry's protos with Triton's (as bundled in tritonclient).

Ferry's ``protos/*.proto`` are our own files, but every package, message,
field, enum value and RPC they define must match Triton's exactly so that
Triton clients work unchanged. These tests compare descriptors field by field
against the ``.proto`` definitions that ship inside ``tritonclient.grpc``.

``tritonclient.grpc`` cannot be imported in the same process as ``protos``:
both register ``inference.*`` symbols (from differently named files) in
protobuf's default descriptor pool, which protobuf rejects as duplicates. The
reference descriptors are therefore exported by a subprocess and loaded into
a private ``DescriptorPool`` here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

from protos import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

OUR_FILES = ("protos/model_config.proto", "protos/grpc_service.proto")
REF_FILES = ("model_config.proto", "grpc_service.proto")
SERVICE = "inference.GRPCInferenceService"

# Parts of Triton's API that Ferry deliberately does not define.
OMITTED_METHODS = frozenset(
    {
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "TraceSetting",
        "LogSettings",
    }
)
OMITTED_TYPES = frozenset(
    {
        "inference.SystemSharedMemoryStatusRequest",
        "inference.SystemSharedMemoryStatusResponse",
        "inference.SystemSharedMemoryRegisterRequest",
        "inference.SystemSharedMemoryRegisterResponse",
        "inference.SystemSharedMemoryUnregisterRequest",
        "inference.SystemSharedMemoryUnregisterResponse",
        "inference.CudaSharedMemoryStatusRequest",
        "inference.CudaSharedMemoryStatusResponse",
        "inference.CudaSharedMemoryRegisterRequest",
        "inference.CudaSharedMemoryRegisterResponse",
        "inference.CudaSharedMemoryUnregisterRequest",
        "inference.CudaSharedMemoryUnregisterResponse",
        "inference.TraceSettingRequest",
        "inference.TraceSettingResponse",
        "inference.LogSettingsRequest",
        "inference.LogSettingsResponse",
    }
)

# Definitions Triton added after some tritonclient releases (e.g. 2.41). An
# older reference may lack them; when the reference has them they are compared
# like everything else. Nested types of a listed message are covered too.
NEWER_TYPES = frozenset(
    {
        "inference.InferResponseStatistics",
        "inference.ModelStatistics.ResponseStatsEntry",
        "inference.ModelMetrics",
    }
)
NEWER_FIELDS = frozenset(
    {
        ("inference.ModelStatistics", 9, "response_stats"),
        ("inference.ModelInput", 9, "is_non_linear_format_io"),
        ("inference.ModelOutput", 7, "is_non_linear_format_io"),
        ("inference.ModelEnsembling", 2, "max_inflight_requests"),
        ("inference.ModelConfig", 25, "runtime"),
        ("inference.ModelConfig", 26, "model_metrics"),
    }
)

_EXPORT_REFERENCE = textwrap.dedent(
    """
    import sys
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    out = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(out.file.add())
    sys.stdout.buffer.write(out.SerializeToString())
    """
)


def _file_protos(files: tuple[FileDescriptor, ...]) -> list[descriptor_pb2.FileDescriptorProto]:
    protos = []
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        protos.append(proto)
    return protos


def _pool_from(protos: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for proto in protos:  # dependencies first
        pool.Add(proto)
    return pool


def _our_protos() -> list[descriptor_pb2.FileDescriptorProto]:
    return _file_protos((model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR))


@pytest.fixture(scope="module")
def ref_pool() -> descriptor_pool.DescriptorPool:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed; it provides the reference protos")
    result = subprocess.run(
        [sys.executable, "-c", _EXPORT_REFERENCE], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    file_set = descriptor_pb2.FileDescriptorSet.FromString(result.stdout)
    assert [f.name for f in file_set.file] == list(REF_FILES)
    return _pool_from(list(file_set.file))


@pytest.fixture(scope="module")
def our_pool() -> descriptor_pool.DescriptorPool:
    """Our descriptors, as registered by the generated modules, in a private pool."""
    return _pool_from(_our_protos())


# --------------------------------------------------------------------------
# Descriptor comparison


@dataclass(frozen=True)
class _Files:
    pool: descriptor_pool.DescriptorPool
    names: tuple[str, ...]

    def files(self) -> list[FileDescriptor]:
        return [self.pool.FindFileByName(name) for name in self.names]

    def messages(self) -> Iterator[Descriptor]:
        def walk(desc: Descriptor) -> Iterator[Descriptor]:
            yield desc
            for nested in desc.nested_types:
                yield from walk(nested)

        for file in self.files():
            for desc in file.message_types_by_name.values():
                yield from walk(desc)

    def enums(self) -> Iterator[EnumDescriptor]:
        for file in self.files():
            yield from file.enum_types_by_name.values()
        for desc in self.messages():
            yield from desc.enum_types

    def services(self) -> Iterator[ServiceDescriptor]:
        for file in self.files():
            yield from file.services_by_name.values()

    def find_message(self, full_name: str) -> Descriptor | None:
        try:
            return self.pool.FindMessageTypeByName(full_name)
        except KeyError:
            return None

    def find_enum(self, full_name: str) -> EnumDescriptor | None:
        try:
            return self.pool.FindEnumTypeByName(full_name)
        except KeyError:
            return None


def _is_newer_type(full_name: str) -> bool:
    return any(full_name == t or full_name.startswith(t + ".") for t in NEWER_TYPES)


def _field_signature(field: FieldDescriptor) -> dict[str, object]:
    """Everything about a field that affects the wire or text format."""
    assert field.containing_type is not None
    msg_proto = descriptor_pb2.DescriptorProto()
    field.containing_type.CopyToProto(msg_proto)
    (proto,) = [f for f in msg_proto.field if f.number == field.number]
    # Oneofs are referenced by index in the proto; compare them by name instead.
    proto.ClearField("oneof_index")
    return {
        "proto": text_format.MessageToString(proto, as_one_line=True),
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "map_entry": bool(
            field.message_type is not None and field.message_type.GetOptions().map_entry
        ),
    }


def _message_signature(desc: Descriptor) -> dict[str, object]:
    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    return {
        "oneofs": sorted(o.name for o in desc.oneofs),
        "options": text_format.MessageToString(proto.options, as_one_line=True),
        "reserved_range": sorted((r.start, r.end) for r in proto.reserved_range),
        "reserved_name": sorted(proto.reserved_name),
    }


def compare(ours: _Files, ref: _Files) -> list[str]:
    """Return every incompatibility between ``ours`` and the reference."""
    problems: list[str] = []
    our_files = ours.files()
    for file in our_files:
        if file.package != "inference":
            problems.append(f"{file.name}: package {file.package!r}, expected 'inference'")

    our_messages = {d.full_name: d for d in ours.messages()}
    for name, desc in our_messages.items():
        ref_desc = ref.find_message(name)
        if ref_desc is None:
            if not _is_newer_type(name):
                problems.append(f"message {name}: not defined by Triton")
            continue
        if _message_signature(desc) != _message_signature(ref_desc):
            problems.append(
                f"message {name}: {_message_signature(desc)} != {_message_signature(ref_desc)}"
            )
        for field in desc.fields:
            ref_field = ref_desc.fields_by_number.get(field.number)
            if ref_field is None:
                if (name, field.number, field.name) not in NEWER_FIELDS:
                    problems.append(f"{name}.{field.name} = {field.number}: not in Triton")
                continue
            ours_sig, ref_sig = _field_signature(field), _field_signature(ref_field)
            if ours_sig != ref_sig:
                problems.append(f"{name} field {field.number}: {ours_sig} != {ref_sig}")
        for ref_field in ref_desc.fields:
            if ref_field.number not in desc.fields_by_number:
                problems.append(f"{name}.{ref_field.name} = {ref_field.number}: missing")
        for nested in ref_desc.nested_types:
            if nested.full_name not in our_messages:
                problems.append(f"message {nested.full_name}: missing")
        our_nested_enums = {e.name for e in desc.enum_types}
        for ref_nested_enum in ref_desc.enum_types:
            if ref_nested_enum.name not in our_nested_enums:
                problems.append(f"enum {ref_nested_enum.full_name}: missing")

    our_enums = {e.full_name: e for e in ours.enums()}
    for name, enum in our_enums.items():
        ref_enum = ref.find_enum(name)
        if ref_enum is None:
            if not _is_newer_type(name):
                problems.append(f"enum {name}: not defined by Triton")
            continue
        our_values = {v.name: v.number for v in enum.values}
        ref_values = {v.name: v.number for v in ref_enum.values}
        if our_values != ref_values:
            problems.append(f"enum {name}: {our_values} != {ref_values}")

    # Every top-level Triton type must be ours or deliberately omitted.
    for file in ref.files():
        for ref_desc in file.message_types_by_name.values():
            full = ref_desc.full_name
            if full not in our_messages and full not in OMITTED_TYPES:
                problems.append(f"message {full}: missing")
        for ref_top_enum in file.enum_types_by_name.values():
            if ref_top_enum.full_name not in our_enums:
                problems.append(f"enum {ref_top_enum.full_name}: missing")

    our_services = {s.full_name: s for s in ours.services()}
    ref_services = {s.full_name: s for s in ref.services()}
    if set(our_services) != {SERVICE} or SERVICE not in ref_services:
        problems.append(f"services: ours {sorted(our_services)}, Triton {sorted(ref_services)}")
        return problems
    service, ref_service = our_services[SERVICE], ref_services[SERVICE]
    for method in service.methods:
        ref_method = ref_service.methods_by_name.get(method.name)
        if ref_method is None:
            problems.append(f"rpc {method.name}: not in Triton")
            continue
        for attr in ("client_streaming", "server_streaming"):
            if getattr(method, attr) != getattr(ref_method, attr):
                problems.append(f"rpc {method.name}: {attr} differs")
        for attr in ("input_type", "output_type"):
            ours_t, ref_t = getattr(method, attr).full_name, getattr(ref_method, attr).full_name
            if ours_t != ref_t:
                problems.append(f"rpc {method.name}: {attr} {ours_t} != {ref_t}")
    for ref_method in ref_service.methods:
        if (
            ref_method.name not in service.methods_by_name
            and ref_method.name not in OMITTED_METHODS
        ):
            problems.append(f"rpc {ref_method.name}: missing")
    return problems


# --------------------------------------------------------------------------
# Tests


def test_generated_modules_use_expected_layout() -> None:
    assert model_config_pb2.DESCRIPTOR.name == "protos/model_config.proto"
    assert grpc_service_pb2.DESCRIPTOR.name == "protos/grpc_service.proto"
    assert [d.name for d in grpc_service_pb2.DESCRIPTOR.dependencies] == [
        "protos/model_config.proto"
    ]
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert model_config_pb2.DESCRIPTOR.package == "inference"


def test_descriptors_match_triton(
    our_pool: descriptor_pool.DescriptorPool, ref_pool: descriptor_pool.DescriptorPool
) -> None:
    problems = compare(_Files(our_pool, OUR_FILES), _Files(ref_pool, REF_FILES))
    assert not problems, "Ferry protos differ from Triton's:\n" + "\n".join(problems)


def test_generated_code_is_up_to_date() -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    repo_root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_service_methods() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == SERVICE
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streaming == {
        "ServerLive": (False, False),
        "ServerReady": (False, False),
        "ModelReady": (False, False),
        "ServerMetadata": (False, False),
        "ModelMetadata": (False, False),
        "ModelInfer": (False, False),
        "ModelStreamInfer": (True, True),
        "ModelConfig": (False, False),
        "ModelStatistics": (False, False),
        "RepositoryIndex": (False, False),
        "RepositoryModelLoad": (False, False),
        "RepositoryModelUnload": (False, False),
    }


def _mutate_field(
    protos: list[descriptor_pb2.FileDescriptorProto], path: list[str], field: str
) -> descriptor_pb2.FieldDescriptorProto:
    file = next(p for p in protos if any(m.name == path[0] for m in p.message_type))
    msg = next(m for m in file.message_type if m.name == path[0])
    for part in path[1:]:
        msg = next(m for m in msg.nested_type if m.name == part)
    return next(f for f in msg.field if f.name == field)


@pytest.mark.parametrize(
    "mutation",
    [
        "field_number",
        "field_name",
        "field_type",
        "field_label",
        "message_type",
        "enum_value",
        "streaming",
        "dropped_field",
        "extra_field",
    ],
)
def test_compare_detects_differences(
    mutation: str, ref_pool: descriptor_pool.DescriptorPool
) -> None:
    """Guard the guard: each kind of incompatibility must be reported."""
    protos = _our_protos()
    mc, svc = protos
    if mutation == "field_number":
        _mutate_field(protos, ["ModelInferRequest"], "raw_input_contents").number = 17
    elif mutation == "field_name":
        _mutate_field(protos, ["InferParameter"], "bool_param").name = "boolean_param"
    elif mutation == "field_type":
        _mutate_field(
            protos, ["ModelConfig"], "max_batch_size"
        ).type = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
    elif mutation == "field_label":
        _mutate_field(
            protos, ["ModelInferRequest", "InferInputTensor"], "shape"
        ).label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    elif mutation == "message_type":
        _mutate_field(
            protos, ["ModelStatistics"], "inference_stats"
        ).type_name = ".inference.InferBatchStatistics"
    elif mutation == "enum_value":
        dtype = next(e for e in mc.enum_type if e.name == "DataType")
        next(v for v in dtype.value if v.name == "TYPE_BF16").number = 15
    elif mutation == "streaming":
        method = next(m for m in svc.service[0].method if m.name == "ModelStreamInfer")
        method.client_streaming = False
    elif mutation == "dropped_field":
        msg = next(m for m in svc.message_type if m.name == "ModelStreamInferResponse")
        del msg.field[0]
    elif mutation == "extra_field":
        msg = next(m for m in svc.message_type if m.name == "ServerLiveResponse")
        msg.field.add(
            name="uptime",
            number=2,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    problems = compare(_Files(_pool_from(protos), OUR_FILES), _Files(ref_pool, REF_FILES))
    assert problems, f"mutation {mutation!r} went undetected"


def _ref_class(pool: descriptor_pool.DescriptorPool, name: str) -> type[Message]:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def test_infer_messages_round_trip_through_triton(
    ref_pool: descriptor_pool.DescriptorPool,
) -> None:
    request = grpc_service_pb2.ModelInferRequest(model_name="simple", model_version="1", id="req-1")
    request.parameters["sequence_id"].uint64_param = 2**63 + 5
    request.parameters["priority"].int64_param = -3
    request.parameters["flag"].bool_param = True
    request.parameters["temperature"].double_param = 0.25
    request.parameters["tag"].string_param = "x"
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "none"
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    request.inputs.add(name="INPUT1", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"\x00abc"
    )
    request.outputs.add(name="OUTPUT0").parameters["binary_data"].bool_param = True
    request.raw_input_contents.append(b"\x01\x02\x03\x04")

    wire = request.SerializeToString(deterministic=True)
    ref_request = _ref_class(ref_pool, "inference.ModelInferRequest").FromString(wire)
    assert ref_request.SerializeToString(deterministic=True) == wire
    assert text_format.MessageToString(ref_request) == text_format.MessageToString(request)

    response = grpc_service_pb2.ModelStreamInferResponse(error_message="")
    out = response.infer_response.outputs.add(name="OUTPUT0", datatype="INT64", shape=[2])
    out.contents.int64_contents.extend([-1, 1])
    response.infer_response.raw_output_contents.append(b"\xff" * 8)
    wire = response.SerializeToString(deterministic=True)
    ref_response = _ref_class(ref_pool, "inference.ModelStreamInferResponse").FromString(wire)
    assert text_format.MessageToString(ref_response) == text_format.MessageToString(response)


class _EchoServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
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
            yield grpc_service_pb2.ModelStreamInferResponse(
                infer_response=self.ModelInfer(request, context)
            )


_TRITON_CLIENT_SCRIPT = textwrap.dedent(
    """
    import queue, sys
    import numpy as np
    import tritonclient.grpc as tc

    def step(name):
        print("step:", name, file=sys.stderr, flush=True)

    client = tc.InferenceServerClient(sys.argv[1])
    step("ServerLive")
    assert client.is_server_live(client_timeout=10)
    step("ModelConfig")
    config = client.get_model_config("m", as_json=True, client_timeout=10)["config"]
    assert config["name"] == "m" and config["max_batch_size"] == 4, config
    assert config["input"][0]["data_type"] == "TYPE_FP32", config

    data = np.array([[1.5, 2.5]], dtype=np.float32)
    tensor = tc.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(data)
    step("ModelInfer")
    result = client.infer(
        "m", [tensor], request_id="abc", parameters={"k": 3}, client_timeout=10
    )
    response = result.get_response()
    assert response.id == "abc", response
    assert response.parameters["echo_k"].int64_param == 3, response
    assert (result.as_numpy("y") == data).all()

    results = queue.Queue()
    step("ModelStreamInfer")
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), stream_timeout=20
    )
    client.async_stream_infer("m", [tensor], request_id="s1")
    result, error = results.get(timeout=20)
    step("stop_stream")
    client.stop_stream()
    assert error is None, error
    assert (result.as_numpy("y") == data).all()
    print("ok")
    """
)


def test_tritonclient_talks_to_our_service() -> None:
    """A real tritonclient.grpc client against a server using our stubs."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # mypy-protobuf marks every RPC abstract; the ones not overridden are never called.
    servicer = _EchoServicer()  # type: ignore[abstract]
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = subprocess.run(
            [sys.executable, "-c", _TRITON_CLIENT_SCRIPT, f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"tritonclient subprocess timed out; its stderr:\n{stderr}")
    finally:
        server.stop(grace=None)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# A Triton config.pbtxt exercising most of the schema.
SAMPLE_CONFIG_PBTXT = """
name: "densenet_onnx"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  },
  {
    name: "mask"
    data_type: TYPE_BOOL
    dims: [ -1 ]
    optional: true
    allow_ragged_batch: true
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    reshape: { shape: [ 1, 1000, 1, 1 ] }
    label_filename: "densenet_labels.txt"
  }
]
batch_input [
  {
    kind: BATCH_ACCUMULATED_ELEMENT_COUNT
    target_name: "INDEX"
    data_type: TYPE_FP32
    source_input: "mask"
  }
]
instance_group [
  {
    name: "gpu_group"
    count: 2
    kind: KIND_GPU
    gpus: [ 0, 1 ]
    rate_limiter {
      resources [ { name: "R1" count: 4 }, { name: "R2" global: true count: 2 } ]
      priority: 2
    }
  },
  { count: 1 kind: KIND_CPU }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 5000
    allow_timeout_override: true
    max_queue_size: 16
  }
  priority_queue_policy {
    key: 2
    value: { timeout_action: REJECT max_queue_size: 4 }
  }
}
optimization {
  graph: { level: 1 }
  priority: PRIORITY_MAX
  cuda { graphs: true busy_wait_events: true output_copy_stream: true }
  execution_accelerators {
    gpu_execution_accelerator : [
      {
        name : "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
      }
    ]
  }
  input_pinned_memory: { enable: false }
}
parameters: {
  key: "intra_op_thread_count"
  value: { string_value: "4" }
}
model_warmup [
  {
    name: "zero_warmup"
    batch_size: 1
    count: 2
    inputs {
      key: "data_0"
      value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true }
    }
  }
]
model_transaction_policy { decoupled: false }
response_cache { enable: true }
model_repository_agents {
  agents [ { name: "checksum" parameters { key: "MD5:model.onnx" value: "abc" } } ]
}
default_model_filename: "model.onnx"
cc_model_filenames { key: "7.5" value: "model_sm75.onnx" }
metric_tags { key: "team" value: "ml" }
"""

SAMPLE_ENSEMBLE_PBTXT = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 4
input [ { name: "RAW" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP16 dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "preprocess"
      model_version: -1
      input_map { key: "IN" value: "RAW" }
      output_map { key: "OUT" value: "pre_out" }
    },
    {
      model_name: "classifier"
      model_version: 3
      input_map { key: "x" value: "pre_out" }
      output_map { key: "y" value: "SCORES" }
    }
  ]
}
"""

SAMPLE_SEQUENCE_PBTXT = """
name: "stateful"
backend: "python"
max_batch_size: 2
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [
    {
      input_name: "INPUT_STATE"
      output_name: "OUTPUT_STATE"
      data_type: TYPE_INT32
      dims: [ 1 ]
      initial_state: { name: "init" data_type: TYPE_INT32 dims: [ 1 ] zero_data: true }
    }
  ]
}
instance_group [ { kind: KIND_MODEL } ]
"""


def test_parse_triton_config_pbtxt() -> None:
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


def test_newer_triton_config_fields_parse() -> None:
    config = text_format.Parse(
        """
        name: "m"
        backend: "pytorch"
        runtime: "model.py"
        input [ { name: "x" data_type: TYPE_BF16 dims: [ 2 ] is_non_linear_format_io: true } ]
        model_metrics {
          metric_control [
            {
              metric_identifier { family: "nv_inference_first_response_histogram_ms" }
              histogram_options { buckets: [ 1, 2, 4, 8 ] }
            }
          ]
        }
        """,
        model_config_pb2.ModelConfig(),
    )
    assert config.runtime == "model.py"
    assert config.input[0].is_non_linear_format_io
    assert list(config.model_metrics.metric_control[0].histogram_options.buckets) == [1, 2, 4, 8]


@pytest.mark.parametrize(
    "pbtxt", [SAMPLE_CONFIG_PBTXT, SAMPLE_ENSEMBLE_PBTXT, SAMPLE_SEQUENCE_PBTXT]
)
def test_model_config_round_trips_through_triton(
    pbtxt: str, ref_pool: descriptor_pool.DescriptorPool
) -> None:
    ours = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
    ref = text_format.Parse(pbtxt, _ref_class(ref_pool, "inference.ModelConfig")())
    assert ours.SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)
    response = grpc_service_pb2.ModelConfigResponse(config=ours)
    wire = response.SerializeToString(deterministic=True)
    ref_response = _ref_class(ref_pool, "inference.ModelConfigResponse").FromString(wire)
    assert ref_response.SerializeToString(deterministic=True) == wire
    assert text_format.MessageToString(ref_response) == text_format.MessageToString(response)


def test_unknown_config_field_is_rejected() -> None:
    with pytest.raises(text_format.ParseError, match="no_such_field"):
        text_format.Parse('name: "m" no_such_field: 1', model_config_pb2.ModelConfig())
