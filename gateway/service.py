"""The GRPCInferenceService RPCs.

ModelInfer and ModelStreamInfer take and return raw bytes (no gRPC-level
(de)serialisation): the request is parsed once for validation and its
original bytes go to Redis; the worker's serialized response goes back to the
client untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

import ferry
from broker.liveness import LiveWorkers
from ferry import metrics
from ferry.errors import FerryError, InvalidArgument, NotFound, Unimplemented
from ferry.lifecycle import cancel_all
from ferry.pbwire import len_field
from ferry.redis_conn import REDIS_DOWN, unavailable
from ferry.repository import ModelVersion, Repository
from ferry.settings import GatewaySettings
from ferry.tracing import OFF, Tracing
from gateway import statistics
from gateway.dispatch import Dispatcher
from gateway.security import may_use, require_model
from gateway.status import describe, raise_for_reply, unary
from gateway.validate import Limits, RequestValidator
from protos import grpc_service_pb2 as pb

log = logging.getLogger("ferry.gateway")

EXTENSIONS = ["model_configuration", "statistics", "model_repository", "parameters"]


class InferenceService:
    def __init__(self, settings: GatewaySettings, repo: Repository, dispatcher: Dispatcher,
                 tracing: Tracing = OFF) -> None:
        self.settings = settings
        self.tracing = tracing
        self.repo = repo
        self.dispatcher = dispatcher
        self.live = LiveWorkers(dispatcher.resp, settings.redis_url, settings.no_worker_grace_s)
        limits = Limits(settings.max_tensor_elements, settings.max_bytes_elements)
        self.validators = {mv.key: RequestValidator(mv, limits) for mv in repo.all_versions()}
        self._labels = {mv.key: (mv.name, str(mv.version)) for mv in repo.all_versions()}

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The model version a request names, if the caller's token may use it (security.require_model)."""
        require_model(name)
        return self.repo.get(name, version)

    # --- health and metadata -------------------------------------------------------

    async def server_live(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=await self.ready())

    async def ready(self) -> bool:
        """Every served model version has at least one live worker."""
        return self.ready_with(lambda mv: self.live.workers_for(mv))

    def ready_with(self, workers_for: Callable[[ModelVersion], int]) -> bool:
        return all(workers_for(mv) for mv in self.repo.all_versions())

    async def model_ready(self, request: Any, context: Any) -> Any:
        mv = self.resolve(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.live.workers_for(mv) > 0)

    async def server_metadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="ferry", version=ferry.__version__, extensions=EXTENSIONS)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        mv = self.resolve(request.name, request.version)
        s = mv.settings
        batch = [-1] if s.max_batch_size > 0 else []

        def meta(t: Any) -> Any:
            tm = pb.ModelMetadataResponse.TensorMetadata
            return tm(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))

        return pb.ModelMetadataResponse(
            name=mv.name,
            versions=[str(v.version) for v in self.repo.versions(mv.name)],
            platform=s.config.platform,
            inputs=[meta(t) for t in s.inputs],
            outputs=[meta(t) for t in s.outputs],
        )

    async def model_config(self, request: Any, context: Any) -> Any:
        mv = self.resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=mv.settings.config)

    async def model_statistics(self, request: Any, context: Any) -> Any:
        if request.name:
            if request.version:
                versions = [self.resolve(request.name, request.version)]
            else:
                self.resolve(request.name)  # NOT_FOUND for unknown names
                versions = self.repo.versions(request.name)
        elif request.version:
            raise InvalidArgument("a version needs a model name")
        else:
            versions = [mv for mv in self.repo.all_versions() if may_use(mv.name)]
        try:
            return await statistics.collect(self.dispatcher.redis, versions)
        except REDIS_DOWN as exc:
            raise unavailable(self.settings.redis_url, exc) from None

    async def repository_index(self, request: Any, context: Any) -> Any:
        if request.repository_name:
            raise NotFound(f"repository {request.repository_name!r} is unknown; Ferry serves one (use '')")
        models = []
        for mv in self.repo.all_versions():
            if not may_use(mv.name):
                continue
            live = self.live.workers_for(mv)
            if request.ready and not live:
                continue
            models.append(pb.RepositoryIndexResponse.ModelIndex(
                name=mv.name, version=str(mv.version),
                state="READY" if live else "UNAVAILABLE",
                reason="" if live else f"no live worker in pool(s) {', '.join(mv.settings.pool_names)}",
            ))
        return pb.RepositoryIndexResponse(models=models)

    async def repository_model_load(self, request: Any, context: Any) -> Any:
        raise Unimplemented("explicit model control is not supported: Ferry serves the repository it started with")

    async def repository_model_unload(self, request: Any, context: Any) -> Any:
        raise Unimplemented("explicit model control is not supported: Ferry serves the repository it started with")

    # --- inference ----------------------------------------------------------------

    def _timeout(self, context: Any) -> float:
        remaining = context.time_remaining()
        limit = self.settings.request_timeout_s
        return limit if remaining is None else min(remaining, limit)

    async def _infer(self, raw: bytes, timeout_s: float, context: Any = None) -> bytes:
        try:
            req = pb.ModelInferRequest.FromString(raw)
        except Exception:
            raise InvalidArgument("request is not a valid ModelInferRequest message") from None
        mv: ModelVersion = self.resolve(req.model_name, req.model_version)
        started = time.perf_counter_ns()
        status = "INTERNAL"
        span = None
        trace = ""
        if self.tracing.enabled:
            span = self.tracing.server_span(context.invocation_metadata() if context else None, mv.name, mv.version)
            trace = self.tracing.traceparent(span)
        try:
            try:
                admission = self.validators[mv.key].check(req)
                self.live.require(mv)
                code, body = await self.dispatcher.submit(mv, admission, raw, timeout_s, trace)
            except FerryError:
                # Failures the gateway decides on; workers count the ones they decide on.
                self.dispatcher.count_failure(mv, time.perf_counter_ns() - started)
                raise
            answer = raise_for_reply(code, body)
            status = "OK"
            return answer
        except FerryError as exc:
            status = exc.code.name
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            if span is not None:
                span.set_attribute("rpc.grpc.status", status)
                span.end()
            if log.isEnabledFor(logging.DEBUG):  # one line per request: --log-level DEBUG only
                log.debug("request answered", extra={
                    "request_id": req.id, "model": mv.name, "version": mv.version, "status": status,
                    "duration_ms": round((time.perf_counter_ns() - started) / 1e6, 3),
                    **({"trace_id": trace.split("-")[1]} if trace else {})})
            labels = self._labels[mv.key]
            metrics.REQUESTS.labels(*labels, status).inc()
            metrics.REQUEST_DURATION.labels(*labels).observe((time.perf_counter_ns() - started) / 1e9)

    async def model_infer(self, raw: bytes, context: Any) -> bytes:
        return await self._infer(raw, self._timeout(context), context)

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """Answer each streamed request as soon as it completes (not in order), like Triton."""
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(raw: bytes) -> None:
            try:
                body = await self._infer(raw, self._timeout(context), context)
                out.put_nowait(len_field(2, body))  # ModelStreamInferResponse.infer_response
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _, message = describe(exc, "ModelStreamInfer")
                out.put_nowait(self._stream_error(raw, message))

        async def reader() -> None:
            try:
                async for raw in requests:
                    t = asyncio.create_task(one(raw))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                out.put_nowait(None)

        read_task = asyncio.create_task(reader())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            await cancel_all([read_task, *tasks])

    @staticmethod
    def _stream_error(raw: bytes, message: str) -> bytes:
        resp = pb.ModelStreamInferResponse(error_message=message)
        try:
            req = pb.ModelInferRequest.FromString(raw)
            resp.infer_response.model_name = req.model_name
            resp.infer_response.model_version = req.model_version
            resp.infer_response.id = req.id
        except Exception:
            pass  # undecodable request: the message alone says so
        return bytes(resp.SerializeToString())


UNARY_RPCS: dict[str, tuple[str, Any, Any]] = {
    # rpc name: (method, request message, response message)
    "ServerLive": ("server_live", pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": ("server_ready", pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": ("model_ready", pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": ("server_metadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": ("model_metadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelConfig": ("model_config", pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelStatistics": ("model_statistics", pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
    "RepositoryIndex": ("repository_index", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "RepositoryModelLoad": ("repository_model_load", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (
        "repository_model_unload", pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse
    ),
}


def method_handlers(service: InferenceService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for rpc, (method, req_cls, resp_cls) in UNARY_RPCS.items():
        handlers[rpc] = grpc.unary_unary_rpc_method_handler(
            unary(rpc, getattr(service, method)),
            request_deserializer=req_cls.FromString,
            response_serializer=resp_cls.SerializeToString,
        )
    # Bytes in, bytes out: see the module docstring.
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(unary("ModelInfer", service.model_infer))
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(service.model_stream_infer)
    return handlers
