"""What the native edge (gateway/edge, docs/edge.md) learns from the gateway behind it.

The edge is a Go front end that queues the inference requests it can admit on Redis
itself and relays every other call to this gateway.  Rather than a second copy of
Ferry's key layout, scripts and model rules, it asks for them here, over two internal
RPCs of service ``ferry.edge.v1.Edge`` (JSON request and response bodies):

* ``Hello {"gateway_id", "protocol"}``: the Redis keys of that edge's reply list and
  heartbeat, the ENQUEUE script, this gateway's limits and timeouts, and
  ``forward_all`` (a reason, or empty) when the edge must relay every call because only
  this gateway can serve them as configured (tokens, tracing);
* ``Model {"name", "version"}``: what admitting a request for that model version needs
  (inputs, queue bound, default level and queue timeout, whether a worker is live), or
  ``forward`` (a reason) when the edge must leave the model's requests to this gateway.
  Unknown models answer NOT_FOUND, as ModelMetadata does.

The edge only queues a request that passes every check of gateway/validate.py in its
simplest form (raw tensors, fixed shapes, no parameters); whatever else it forwards, and
this gateway gives its usual answer.  Neither RPC reveals more than ModelConfig and
``ferry redis-acl`` already do, and both pass the gateway's token check like any RPC.
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc

from broker import keys, scripts
from broker.messages import Stat
from ferry import metrics
from ferry.errors import InvalidArgument
from gateway import dispatch
from gateway.service import InferenceService
from gateway.status import unary
from gateway.validate import SCHEDULING_PARAMETERS

SERVICE = "ferry.edge.v1.Edge"
PROTOCOL = 1
SPEC_TTL_S = 1.0  # how stale the edge's view of a model (its liveness above all) may be
_GATEWAY_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise InvalidArgument("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class EdgeApi:
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def hello(self, raw: bytes, context: Any) -> bytes:
        body = _body(raw)
        gateway_id = body.get("gateway_id")
        if not isinstance(gateway_id, str) or not _GATEWAY_ID.fullmatch(gateway_id):
            raise InvalidArgument("gateway_id must be 1-200 characters of A-Z a-z 0-9 . _ : -")
        s = self.service.settings
        reasons = []
        if s.auth_tokens_file:
            reasons.append("the gateway checks tokens")
        if self.service.tracing.enabled:
            reasons.append("the gateway traces requests")
        return _json({
            "protocol": PROTOCOL,
            "gateway_alive": keys.gateway_alive(gateway_id),
            "reply_list": keys.reply_list(gateway_id),
            "alive_ttl_ms": keys.GATEWAY_ALIVE_TTL_MS,
            "reply_ttl_ms": keys.REPLY_TTL_MS,
            "heartbeat_s": keys.HEARTBEAT_INTERVAL_S,
            "enqueue": scripts.ENQUEUE,
            "enqueue_sha": scripts.sha(scripts.ENQUEUE),
            "request_timeout_s": s.request_timeout_s,
            "max_inflight": s.max_inflight,
            "flush_interval_us": s.flush_interval_edge_us,
            "max_group": dispatch.MAX_GROUP,
            "redis_timeout_s": s.redis_timeout_s,
            "max_message_bytes": s.max_message_bytes,
            "max_elements": s.max_tensor_elements,
            "read_parameters": list(SCHEDULING_PARAMETERS),
            "fail_count_field": Stat.FAIL_COUNT,
            "fail_ns_field": Stat.FAIL_NS,
            "spec_ttl_s": SPEC_TTL_S,
            "latency_buckets": list(metrics.LATENCY_BUCKETS),
            "forward_all": " and ".join(reasons),
        })

    async def model(self, raw: bytes, context: Any) -> bytes:
        body = _body(raw)
        name, version = body.get("name", ""), body.get("version", "")
        if not isinstance(name, str) or not isinstance(version, str):
            raise InvalidArgument("name and version must be strings")
        mv = self.service.resolve(name, version)  # NOT_FOUND, PERMISSION_DENIED as for any RPC
        s = mv.settings
        forward = ""
        if any(-1 in t.dims for t in s.inputs):
            forward = "variable dimensions (shape keys)"
        elif any(t.dtype.is_bytes for t in s.inputs):
            forward = "BYTES inputs"
        return _json({
            "name": mv.name,
            "version": mv.version,
            "request_stream": keys.request_stream(mv.name, mv.version),
            "queue_count": keys.queue_count(mv.name, mv.version),
            "stats_hash": keys.stats_hash(mv.name, mv.version),
            "max_queue_size": s.queue_policy.max_queue_size,
            "max_batch": s.max_batch_size,
            "level": s.default_priority_level - 1 if s.priority_levels else 0,
            "queue_timeout_us": s.queue_policy.default_timeout_us,
            "inputs": [{"name": t.name, "datatype": t.dtype.name, "size": t.dtype.size, "dims": list(t.dims)}
                       for t in s.inputs],
            "outputs": [t.name for t in s.outputs],
            "live": self.service.live.workers_for(mv) > 0,
            "forward": forward,
        })


def method_handlers(service: InferenceService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    api = EdgeApi(service)
    return {
        "Hello": grpc.unary_unary_rpc_method_handler(unary("Edge/Hello", api.hello)),
        "Model": grpc.unary_unary_rpc_method_handler(unary("Edge/Model", api.model)),
    }
