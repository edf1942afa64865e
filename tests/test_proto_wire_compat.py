"""Wire-compatibility of Ferry's protos with Triton's (as bundled in tritonclient).

Ferry's ``protos/*.proto`` are our own files, but every package, message,
field, enum value and RPC they define must match Triton's exactly so that
Triton clients work unchanged. These tests compare descriptors field by field
against the ``.proto`` definitions that ship inside ``tritonclient.grpc``.

``tritonclient.grpc`` cannot be imported in the same process as ``protos``:
both register ``inference.*`` symbols (from differently named files) in
protobuf's default descriptor pool, which protobuf rejects as duplicates. The
pytest process uses tritonclient as a client elsewhere, so this module imports
neither (nor anything that imports ``protos``). Each side runs in its own
subprocess (``tests/support/proto_ours.py`` and ``tests/support/proto_triton.py``):
they export their ``FileDescriptorProto``s, which are loaded here into two
private ``DescriptorPool``s, and they parse, encode and decode messages whose
bytes and text are compared here.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
OURS_SCRIPT = SUPPORT / "proto_ours.py"
TRITON_SCRIPT = SUPPORT / "proto_triton.py"
# Every subprocess gets a timeout; these are generous next to the ~1 s they take.
SUBPROCESS_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 45.0

# Modules this process must never import (see the module docstring).
FORBIDDEN_MODULES = ("protos", "tritonclient.grpc", "ferry.model_config", "gateway", "workers")

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


def _forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES))


@pytest.fixture(scope="module", autouse=True)
def _imports_neither_side() -> Iterator[None]:
    """Fail if any test here imports ``protos`` or ``tritonclient.grpc`` in-process."""
    before = set(sys.modules)
    yield
    imported = _forbidden(set(sys.modules) - before)
    assert not imported, f"tests imported {imported} into the pytest process"


def _run(script: Path, *args: str, stdin: bytes | None = None, timeout: float = SUBPROCESS_TIMEOUT_S) -> bytes:
    """Run a support script; return its stdout, failing the test with its stderr otherwise."""
    cmd = [sys.executable, str(script), *args]
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, cwd=REPO_ROOT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"{script.name} {' '.join(args)} timed out after {timeout} s; its stderr:\n{stderr}")
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        pytest.fail(f"{script.name} {' '.join(args)} exited {result.returncode}; its stderr:\n{stderr}")
    return result.stdout


def _require_tritonclient() -> None:
    # find_spec of the top-level package does not import tritonclient.grpc.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed; it provides the reference protos")


def _file_set(data: bytes) -> list[descriptor_pb2.FileDescriptorProto]:
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def _pool_from(protos: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for proto in protos:  # dependencies first
        pool.Add(proto)
    return pool


@pytest.fixture(scope="module")
def our_export() -> bytes:
    """Our FileDescriptorSet, as registered by the generated modules (serialized)."""
    data = _run(OURS_SCRIPT, "export")
    assert [f.name for f in _file_set(data)] == list(OUR_FILES)
    return data


def _our_protos(our_export: bytes) -> list[descriptor_pb2.FileDescriptorProto]:
    """A fresh, mutable copy of our FileDescriptorProtos."""
    return _file_set(our_export)


@pytest.fixture(scope="module")
def our_pool(our_export: bytes) -> descriptor_pool.DescriptorPool:
    """Our descriptors, as registered by the generated modules, in a private pool."""
    return _pool_from(_file_set(our_export))


@pytest.fixture(scope="module")
def ref_pool() -> descriptor_pool.DescriptorPool:
    _require_tritonclient()
    protos = _file_set(_run(TRITON_SCRIPT, "export"))
    assert [f.name for f in protos] == list(REF_FILES)
    return _pool_from(protos)


@pytest.fixture(scope="module")
def our_checks() -> dict[str, str | None]:
    """Results of the text-format checks run against our generated classes."""
    results: dict[str, str | None] = json.loads(_run(OURS_SCRIPT, "check"))
    return results


@pytest.fixture(scope="module")
def our_encoded() -> dict[str, Any]:
    """Messages built and serialized by our generated classes."""
    encoded: dict[str, Any] = json.loads(_run(OURS_SCRIPT, "encode"))
    return encoded


@pytest.fixture(scope="module")
def triton_decoded(our_encoded: dict[str, Any]) -> dict[str, Any]:
    """Triton's parse of the samples, and its decoding of every message we encoded."""
    _require_tritonclient()
    to_decode = dict(our_encoded["messages"])
    for name, item in our_encoded["configs"].items():
        to_decode[f"config_response:{name}"] = item["response"]
    decoded: dict[str, Any] = json.loads(_run(TRITON_SCRIPT, "decode", stdin=json.dumps(to_decode).encode()))
    return decoded


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
        "map_entry": bool(field.message_type is not None and field.message_type.GetOptions().map_entry),
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
            problems.append(f"message {name}: {_message_signature(desc)} != {_message_signature(ref_desc)}")
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
        if ref_method.name not in service.methods_by_name and ref_method.name not in OMITTED_METHODS:
            problems.append(f"rpc {ref_method.name}: missing")
    return problems


# --------------------------------------------------------------------------
# Tests


def test_this_module_imports_neither_side() -> None:
    """Importing this module in a fresh interpreter must not pull in either side."""
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('proto_wire_compat_probe', {str(Path(__file__))!r})\n"
        "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _forbidden(set(result.stdout.split())) == []


def test_generated_modules_use_expected_layout(our_export: bytes) -> None:
    model_config, grpc_service = _file_set(our_export)
    assert model_config.name == "protos/model_config.proto"
    assert grpc_service.name == "protos/grpc_service.proto"
    assert list(grpc_service.dependency) == ["protos/model_config.proto"]
    assert grpc_service.package == "inference"
    assert model_config.package == "inference"


def test_descriptors_match_triton(
    our_pool: descriptor_pool.DescriptorPool, ref_pool: descriptor_pool.DescriptorPool
) -> None:
    problems = compare(_Files(our_pool, OUR_FILES), _Files(ref_pool, REF_FILES))
    assert not problems, "Ferry protos differ from Triton's:\n" + "\n".join(problems)


def test_generated_code_is_up_to_date() -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    _run(REPO_ROOT / "scripts" / "gen_protos.py", "--check", timeout=60)


def test_service_methods(our_pool: descriptor_pool.DescriptorPool) -> None:
    service = our_pool.FindFileByName("protos/grpc_service.proto").services_by_name["GRPCInferenceService"]
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
    mutation: str, our_export: bytes, ref_pool: descriptor_pool.DescriptorPool
) -> None:
    """Guard the guard: each kind of incompatibility must be reported."""
    protos = _our_protos(our_export)
    mc, svc = protos
    if mutation == "field_number":
        _mutate_field(protos, ["ModelInferRequest"], "raw_input_contents").number = 17
    elif mutation == "field_name":
        _mutate_field(protos, ["InferParameter"], "bool_param").name = "boolean_param"
    elif mutation == "field_type":
        _mutate_field(protos, ["ModelConfig"], "max_batch_size").type = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
    elif mutation == "field_label":
        _mutate_field(
            protos, ["ModelInferRequest", "InferInputTensor"], "shape"
        ).label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    elif mutation == "message_type":
        _mutate_field(protos, ["ModelStatistics"], "inference_stats").type_name = ".inference.InferBatchStatistics"
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


@pytest.mark.parametrize("message", ["infer_request", "stream_response"])
def test_infer_messages_round_trip_through_triton(
    message: str, our_encoded: dict[str, Any], triton_decoded: dict[str, Any]
) -> None:
    ours, theirs = our_encoded["messages"][message], triton_decoded["messages"][message]
    assert base64.b64decode(theirs["wire"]) == base64.b64decode(ours["wire"])
    assert theirs["text"] == ours["text"]


@contextmanager
def _echo_server() -> Iterator[str]:
    """Run ``proto_ours.py serve``; yield its address; stop it by closing its stdin."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(OURS_SCRIPT), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO_ROOT,
        )
        assert proc.stdin is not None and proc.stdout is not None

        def server_stderr() -> str:
            stderr.seek(0)
            return stderr.read().decode(errors="replace")

        try:
            ready, _, _ = select.select([proc.stdout], [], [], SUBPROCESS_TIMEOUT_S)
            line = proc.stdout.readline().decode() if ready else ""
            if not line.startswith("port "):
                pytest.fail(f"echo server did not start (said {line!r}); its stderr:\n{server_stderr()}")
            yield f"127.0.0.1:{int(line.split()[1])}"
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()


def test_tritonclient_talks_to_our_service() -> None:
    """A real tritonclient.grpc client against a server using our stubs (each in its own process)."""
    _require_tritonclient()
    with _echo_server() as address:
        stdout = _run(TRITON_SCRIPT, "client", address, timeout=CLIENT_TIMEOUT_S)
    assert stdout.decode().strip() == "ok"


ROUND_TRIP_SAMPLES = ("config", "ensemble", "sequence")


def test_round_trip_samples_are_all_tested(our_encoded: dict[str, Any], triton_decoded: dict[str, Any]) -> None:
    assert sorted(our_encoded["configs"]) == sorted(ROUND_TRIP_SAMPLES)
    assert sorted(triton_decoded["configs"]) == sorted(ROUND_TRIP_SAMPLES)


@pytest.mark.parametrize("sample", ROUND_TRIP_SAMPLES)
def test_model_config_round_trips_through_triton(
    sample: str, our_encoded: dict[str, Any], triton_decoded: dict[str, Any]
) -> None:
    ours = our_encoded["configs"][sample]
    # Both sides parse the same config.pbtxt to the same bytes.
    assert base64.b64decode(triton_decoded["configs"][sample]) == base64.b64decode(ours["config"]["wire"])
    # Triton decodes our ModelConfigResponse and re-encodes it to the same bytes and text.
    theirs = triton_decoded["messages"][f"config_response:{sample}"]
    assert base64.b64decode(theirs["wire"]) == base64.b64decode(ours["response"]["wire"])
    assert theirs["text"] == ours["response"]["text"]


def test_our_checks_are_all_reported(our_checks: dict[str, str | None]) -> None:
    assert sorted(our_checks) == sorted(
        ["parse_triton_config_pbtxt", "newer_triton_config_fields_parse", "unknown_config_field_is_rejected"]
    )


def test_parse_triton_config_pbtxt(our_checks: dict[str, str | None]) -> None:
    assert our_checks["parse_triton_config_pbtxt"] is None, our_checks["parse_triton_config_pbtxt"]


def test_newer_triton_config_fields_parse(our_checks: dict[str, str | None]) -> None:
    assert our_checks["newer_triton_config_fields_parse"] is None, our_checks["newer_triton_config_fields_parse"]


def test_unknown_config_field_is_rejected(our_checks: dict[str, str | None]) -> None:
    assert our_checks["unknown_config_field_is_rejected"] is None, our_checks["unknown_config_field_is_rejected"]
