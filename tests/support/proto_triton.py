"""Triton's side of tests/test_proto_wire_compat.py, run as a subprocess.

This process imports ``tritonclient.grpc`` (whose bundled protos are the
reference) and never Ferry's ``protos``.

Commands (results on stdout):

* ``export``: a serialized ``FileDescriptorSet`` of tritonclient's
  ``model_config.proto`` and ``grpc_service.proto``, dependencies first;
* ``decode``: reads JSON ``{key: {"type": full name, "wire": base64}}`` on stdin,
  decodes each with tritonclient's classes and writes JSON
  ``{"configs": {sample: base64}, "messages": {key: {"wire": base64, "text": str}}}``,
  where ``configs`` are the round-trip samples parsed by tritonclient's
  ``ModelConfig`` and ``wire`` is the decoded message re-serialized;
* ``client ADDRESS``: drives a server at ADDRESS with ``tritonclient.grpc``;
  prints ``ok`` on success.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message
from proto_samples import ROUND_TRIP_SAMPLES
from tritonclient.grpc import model_config_pb2, service_pb2

REF_FILES = (model_config_pb2.DESCRIPTOR.name, service_pb2.DESCRIPTOR.name)


def export() -> None:
    out = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(out.file.add())
    sys.stdout.buffer.write(out.SerializeToString())


def _message_class(full_name: str) -> type[Message]:
    desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    assert desc.file.name in REF_FILES, f"{full_name} comes from {desc.file.name}, not tritonclient"
    return message_factory.GetMessageClass(desc)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode() -> None:
    requests = json.load(sys.stdin)
    configs = {
        name: _b64(text_format.Parse(pbtxt, model_config_pb2.ModelConfig()).SerializeToString(deterministic=True))
        for name, pbtxt in ROUND_TRIP_SAMPLES.items()
    }
    messages = {}
    for key, item in requests.items():
        message = _message_class(item["type"]).FromString(base64.b64decode(item["wire"]))
        messages[key] = {
            "wire": _b64(message.SerializeToString(deterministic=True)),
            "text": text_format.MessageToString(message),
        }
    json.dump({"configs": configs, "messages": messages}, sys.stdout)


def _step(name: str) -> None:
    print("step:", name, file=sys.stderr, flush=True)


def client(address: str) -> None:
    client = tc.InferenceServerClient(address)
    _step("ServerLive")
    assert client.is_server_live(client_timeout=10)
    _step("ModelConfig")
    config = client.get_model_config("m", as_json=True, client_timeout=10)["config"]
    assert config["name"] == "m" and config["max_batch_size"] == 4, config
    assert config["input"][0]["data_type"] == "TYPE_FP32", config

    data = np.array([[1.5, 2.5]], dtype=np.float32)
    tensor = tc.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(data)
    _step("ModelInfer")
    result = client.infer("m", [tensor], request_id="abc", parameters={"k": 3}, client_timeout=10)
    response = result.get_response()
    assert response.id == "abc", response
    assert response.parameters["echo_k"].int64_param == 3, response
    assert (result.as_numpy("y") == data).all()

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    _step("ModelStreamInfer")
    client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=20)
    client.async_stream_infer("m", [tensor], request_id="s1")
    result, error = results.get(timeout=20)
    _step("stop_stream")
    client.stop_stream()
    assert error is None, error
    assert (result.as_numpy("y") == data).all()
    print("ok")


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "export" and not args:
        export()
    elif command == "decode" and not args:
        decode()
    elif command == "client" and len(args) == 1:
        client(args[0])
    else:
        sys.exit(f"usage: {sys.argv[0]} {{export | decode | client ADDRESS}}")
