"""Starts MLServer on a model repository, plus the one Triton RPC perf_analyzer needs and MLServer lacks.

Usage (in MLServer's venv): python mlserver_launch.py MODEL_REPOSITORY

This is `mlserver start MODEL_REPOSITORY` (same settings loading, same uvloop event loop, same MLServer object and
signal handling) with one addition: a handler for `inference.GRPCInferenceService/ModelConfig`, which perf_analyzer
calls once at start-up to learn max_batch_size (without it, it cannot tell that INPUT0 [-1,256] has a batch
dimension). The handler is registered on MLServer's own grpc.aio server, as a generic handler next to MLServer's
servicer, before the server starts; MLServer's servicer has no ModelConfig method, so the RPC falls through to it.
ModelInfer and everything else on the inference path stay MLServer's.

The ModelConfigResponse is serialised by hand (a handful of protobuf fields): tritonclient's generated modules
cannot be imported here, because they register the same `inference.*` message names as MLServer's dataplane_pb2
in protobuf's default descriptor pool ("duplicate symbol 'inference.ServerLiveRequest'").
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import grpc
from mlserver import MLServer
from mlserver.cli.serve import load_settings
from mlserver.grpc import GRPCServer
from mlserver.logging import configure_logger
from mlserver.settings import ModelSettings
from mlserver.utils import install_uvloop_event_loop

# Triton's model_config.proto DataType values, keyed by the OIP datatype names MLServer uses.
_TRITON_DTYPE = {
    "BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5, "INT8": 6, "INT16": 7, "INT32": 8,
    "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12, "BYTES": 13, "BF16": 14,
}
_KIND_CPU = 2  # ModelInstanceGroup.Kind.KIND_CPU


# --- minimal protobuf wire format (proto3: default values are simply left out) ---

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are encoded as 10-byte two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value) if value else b""


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode()) if value else b""


def _packed(field: int, values: Sequence[int]) -> bytes:
    return _bytes(field, b"".join(_varint(v) for v in values)) if values else b""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _request_name(request: bytes) -> str:
    """Field 1 (name) of a ModelConfigRequest; other fields (version) are skipped."""
    pos, name = 0, ""
    while pos < len(request):
        key, pos = _read_varint(request, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(request, pos)
        elif wire == 2:
            size, pos = _read_varint(request, pos)
            if key >> 3 == 1:
                name = request[pos:pos + size].decode()
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire} in ModelConfigRequest")
    return name


def model_config_response(model: ModelSettings) -> bytes:
    """A serialised inference.ModelConfigResponse describing `model` as Triton would."""
    batched = model.max_batch_size > 0

    def dims(shape: Sequence[int]) -> list[int]:
        # Triton's config lists dims without the batch dimension when max_batch_size > 0.
        return list(shape[1:] if batched and shape else shape)

    config = _str(1, model.name) + _str(2, model.platform) + _int(4, model.max_batch_size)
    for t in model.inputs:  # ModelInput: name=1, data_type=2, dims=4
        config += _bytes(5, _str(1, t.name) + _int(2, _TRITON_DTYPE[t.datatype]) + _packed(4, dims(t.shape)))
    for t in model.outputs:  # ModelOutput: name=1, data_type=2, dims=3
        config += _bytes(6, _str(1, t.name) + _int(2, _TRITON_DTYPE[t.datatype]) + _packed(3, dims(t.shape)))
    config += _bytes(7, _int(2, 1) + _int(4, _KIND_CPU))  # instance_group { count: 1 kind: KIND_CPU }
    if model.max_batch_size > 1 and model.max_batch_time > 0:  # dynamic_batching { max_queue_delay_microseconds }
        config += _bytes(11, _int(2, round(model.max_batch_time * 1e6)))
    return _bytes(1, config)  # ModelConfigResponse: config=1


def model_config_handler(configs: dict[str, bytes]) -> grpc.GenericRpcHandler:
    async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = _request_name(request)
        if name not in configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Model {name} not found")
        return configs[name]

    # No (de)serialisers: the handler takes and returns the raw message bytes.
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelConfig": grpc.unary_unary_rpc_method_handler(model_config)}
    )


class _GRPCServerWithModelConfig(GRPCServer):  # type: ignore[misc]  # mlserver ships no type information
    def __init__(self, *args: object, model_configs: dict[str, bytes]) -> None:
        super().__init__(*args)
        self._model_configs = model_configs

    def _create_server(self) -> grpc.aio.Server:
        # MLServer builds (and adds its servicers to) the grpc.aio server here, and starts it right after.
        server = super()._create_server()
        server.add_generic_rpc_handlers((model_config_handler(self._model_configs),))
        return server


class _MLServerWithModelConfig(MLServer):  # type: ignore[misc]
    def __init__(self, settings: object, model_configs: dict[str, bytes]) -> None:
        self._model_configs = model_configs  # read by _create_servers(), which MLServer.__init__ calls
        super().__init__(settings)

    def _create_servers(self) -> None:
        super()._create_servers()
        self._grpc_server = _GRPCServerWithModelConfig(
            self._settings, self._data_plane, self._model_repository_handlers, model_configs=self._model_configs
        )


async def _serve(folder: str) -> None:
    # What `mlserver start` does (mlserver/cli/main.py), with the subclass in place of MLServer.
    settings, models_settings = await load_settings(folder)
    configs = {m.name: model_config_response(m) for m in models_settings}
    server = _MLServerWithModelConfig(settings, configs)
    await server.start(models_settings)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: mlserver_launch.py MODEL_REPOSITORY")
    configure_logger()
    install_uvloop_event_loop()
    asyncio.run(_serve(sys.argv[1]))


if __name__ == "__main__":
    main()
