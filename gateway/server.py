"""Assemble and run the gateway's gRPC server: inference service, health, reflection."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ferry.errors import ConfigError
from ferry.lifecycle import settle_heap
from ferry.repository import Repository
from ferry.settings import GatewaySettings
from ferry.tracing import Tracing
from gateway import edge_api, security
from gateway.dispatch import Dispatcher
from gateway.service import InferenceService, method_handlers
from protos import grpc_service_pb2 as pb

log = logging.getLogger("ferry.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _mirror_readiness(service: InferenceService, health_servicer: health_aio.HealthServicer) -> None:
    """Keep grpc.health.v1 in step with ServerReady, for load balancers and probes."""
    last: list[bool | None] = [None]

    async def on_refresh(served: Counter[tuple[str, int]]) -> None:
        ready = service.ready_with(lambda mv: served[mv.key])
        if ready != last[0]:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)
            log.info("readiness: %s", "ready" if ready else "not ready (waiting for workers)")
            last[0] = ready

    service.live.on_refresh = on_refresh


async def serve(
    settings: GatewaySettings, repo: Repository, stop: asyncio.Event,
    on_started: Callable[[int], None] | None = None,
) -> None:
    tracing = Tracing("ferry-gateway", settings.otlp_endpoint, settings.trace_sample_ratio, settings.gateway_id)
    dispatcher = Dispatcher(settings)  # connects on first use
    service = InferenceService(settings, repo, dispatcher, tracing)
    credentials = security.server_credentials(settings)  # ConfigError now, not at the first handshake
    server = grpc.aio.server(interceptors=security.interceptors(settings), options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC turns SO_REUSEPORT on by default: a forgotten gateway would then silently share the port.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(service)),
        grpc.method_handlers_generic_handler(edge_api.SERVICE, edge_api.method_handlers(service)),
    ))
    health_servicer = health_aio.HealthServicer()
    _mirror_readiness(service, health_servicer)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        address = f"{settings.host}:{settings.grpc_port}"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind to address"
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.grpc_port}: the port is taken or the address is not "
            "this host's; pick another --grpc-port, or, to share it between gateway processes, start every "
            "one of them with --reuse-port"
        )
    # Only once the port is ours: a gateway that cannot serve must not announce itself in Redis.
    await dispatcher.start()
    service.live.start()
    await server.start()
    settle_heap()
    log.info("gateway %s listening on %s:%d (%s%s)", settings.gateway_id, settings.host, port,
             "mTLS" if settings.tls_client_ca_file else "TLS" if credentials else "plaintext",
             ", tokens required" if settings.auth_tokens_file else "")
    if on_started:
        on_started(port)
    try:
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        # Calls in flight finish (their replies still arrive); new ones are refused.
        await server.stop(settings.grace_s)
        await service.live.close()
        await dispatcher.close()
        tracing.shutdown()
        log.info("gateway %s stopped", settings.gateway_id)
