"""Who may talk to the gateway: TLS or mTLS from files, and bearer tokens with per-token models.

Transport.  ``tls_cert_file`` and ``tls_key_file`` (PEM) make the gateway serve TLS only; with
``tls_client_ca_file`` as well, every client must present a certificate signed by that CA (mTLS).
gRPC asks for the certificate before each new connection's handshake; the files are then
checked (one ``stat`` each) and read again if any changed, so a rotated certificate (say,
cert-manager renewing a Secret) is served without a restart.  A change that does not load
(a half-written pair, a key that does not match) is logged and skipped: connections keep the
previous certificate until the files are whole again.

Authentication.  With ``auth_tokens_file`` every RPC needs a token in its metadata, as
``authorization: Bearer <token>`` or ``x-api-key: <token>``, except the services or methods in
``auth_open`` (by default the standard health service, so that load balancers and Kubernetes
probes need no token).  The file is JSON and holds SHA-256 digests, never the tokens::

    {"tokens": [
      {"name": "team-a", "sha256": "<hex digest of the token>", "models": ["mlp", "resnet"]},
      {"name": "ops",    "sha256": "<hex digest>",              "models": ["*"]}
    ]}

(``ferry token`` prints a new token and its entry.)  The file is read again when it changes,
checked at most once a second.  A missing, malformed or unknown token gets UNAUTHENTICATED; a
model the token does not list gets PERMISSION_DENIED with the same message whether or not the
model exists, and the repository index lists only the token's models, so a token reveals no
more of the repository than it may use.  Tokens are never logged: only a grant's ``name`` is.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ferry.errors import ConfigError, PermissionDenied, Unauthenticated
from ferry.settings import GatewaySettings
from gateway.status import grpc_code

log = logging.getLogger("ferry.gateway")

ALL = "*"
RELOAD_CHECK_S = 1.0
# The models the current call's token may use; None: any (authentication off, or a "*" grant).
ALLOWED: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("ferry_allowed", default=None)


def require_model(name: str) -> None:
    """PERMISSION_DENIED unless the calling token may use ``name`` (the same answer for unknown models)."""
    allowed = ALLOWED.get()
    if allowed is not None and name not in allowed:
        raise PermissionDenied(f"this token may not use model {name!r}")


def may_use(name: str) -> bool:
    allowed = ALLOWED.get()
    return allowed is None or name in allowed


# --- TLS --------------------------------------------------------------------------------------


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...]:
    """What tells a changed file: a rotation may move a new file into place (new inode) or rewrite it."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class CertificateFiles:
    """The PEM files behind the gateway's TLS, read again whenever they change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = [cert, key] + ([client_ca] if client_ca else [])
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp: tuple[tuple[int, int, int], ...] = ()

    def load(self) -> Any:
        """A grpc certificate configuration from the files as they are now (ConfigError if unusable)."""
        try:
            stamp = _stamp(self.paths)
            # The ssl module checks that the key matches the certificate, which gRPC would only
            # find out during a client's handshake.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
            cert, key = self.cert.read_bytes(), self.key.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca else None
            if ca is not None:
                ssl.create_default_context(cadata=ca.decode("ascii"))
        except (OSError, ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot use the TLS files {', '.join(map(str, self.paths))}: {exc}; tls_cert_file and tls_key_file "
                "must be a PEM certificate (chain) and its private key, tls_client_ca_file PEM CA certificates"
            ) from None
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        """gRPC's per-connection callback: a new configuration if the files changed, else None."""
        try:
            if _stamp(self.paths) == self._stamp:
                return None
            config = self.load()
        except (OSError, ConfigError) as exc:
            log.warning("TLS files changed but do not load (%s); keeping the previous certificate", exc)
            return None
        log.info("TLS certificate reloaded from %s", self.cert)
        return config


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    ca = Path(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    files = CertificateFiles(Path(settings.tls_cert_file), Path(settings.tls_key_file), ca)
    return grpc.dynamic_ssl_server_credentials(files.load(), files.fetch, require_client_authentication=ca is not None)


# --- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    name: str
    models: frozenset[str] | None  # None: every model


def parse_tokens(text: str, source: str) -> dict[str, Grant]:
    """{sha256 hex digest: grant} from the tokens file's JSON (ConfigError naming the problem)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"tokens"} or not isinstance(doc["tokens"], list):
        raise ConfigError(f'{source}: expected {{"tokens": [...]}} and nothing else')
    grants: dict[str, Grant] = {}
    for i, entry in enumerate(doc["tokens"]):
        where = f"{source}: tokens[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "sha256", "models"}:
            raise ConfigError(f'{where}: expected exactly "name", "sha256" and "models"')
        name, digest, models = entry["name"], entry["sha256"], entry["models"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name must be a non-empty string")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where} ({name}): sha256 must be 64 lowercase hex digits (the token's digest)")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f'{where} ({name}): models must be a non-empty list of model names, or ["*"]')
        if digest in grants:
            raise ConfigError(f"{where} ({name}): the same token as {grants[digest].name!r}")
        grants[digest] = Grant(name, None if ALL in models else frozenset(models))
    return grants


class TokenFile:
    """The tokens file, read again (at most once per RELOAD_CHECK_S) when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checked = time.monotonic()
        self.grants = parse_tokens(self._read(), str(path))
        self._stamp = _stamp([path])

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read auth_tokens_file {self.path}: {exc}") from None

    def lookup(self, token: str) -> Grant | None:
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            self._maybe_reload()
        return self.grants.get(hashlib.sha256(token.encode()).hexdigest())

    def _maybe_reload(self) -> None:
        try:
            stamp = _stamp([self.path])
            if stamp == self._stamp:
                return
            self.grants = parse_tokens(self._read(), str(self.path))
            self._stamp = stamp
            log.info("auth tokens reloaded from %s (%d tokens)", self.path, len(self.grants))
        except (OSError, ConfigError) as exc:
            log.warning("auth tokens file changed but does not load (%s); keeping the previous tokens", exc)


def _token(metadata: Any) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "authorization" and isinstance(value, str):
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                return rest.strip()
        elif key == "x-api-key" and isinstance(value, str) and value:
            return value
    return None


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], behaviour: Callable[[Callable[..., Any]], Callable[..., Any]]
          ) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour replaced by ``behaviour(original)``, of the same RPC kind."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            behaviour(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            behaviour(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            behaviour(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
    assert handler.stream_stream is not None  # one of the four is always set
    return grpc.stream_stream_rpc_method_handler(
        behaviour(handler.stream_stream), handler.request_deserializer, handler.response_serializer)


def _streaming_response(handler: grpc.RpcMethodHandler[Any, Any]) -> bool:
    return bool(handler.unary_stream or handler.stream_stream)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The one place every RPC's token is checked (see the module docstring)."""

    def __init__(self, tokens: TokenFile, open_rpcs: Sequence[str]) -> None:
        self.tokens = tokens
        # "/grpc.health.v1.Health" opens a whole service, "/pkg.Svc/Method" one method.
        self.open = tuple("/" + o.strip("/") for o in open_rpcs if o.strip("/"))

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or any(method == o or method.startswith(o + "/") for o in self.open):
            return handler
        token = _token(details.invocation_metadata)
        grant = self.tokens.lookup(token) if token else None
        if grant is None:
            message = ("a valid token is required: send it as 'authorization: Bearer <token>' or "
                       "'x-api-key: <token>' metadata" if token is None else "the token is not valid")
            return _wrap(handler, lambda _: _deny(_streaming_response(handler), message))
        return _wrap(handler, lambda fn: _bind(_streaming_response(handler), fn, grant.models))


def _deny(streaming: bool, message: str) -> Callable[..., Any]:
    err = Unauthenticated(message)
    if streaming:
        async def deny_stream(request: Any, context: Any) -> Any:
            await context.abort(grpc_code(err.code), err.message)
            yield  # pragma: no cover - abort raises; this makes it an async generator

        return deny_stream

    async def deny(request: Any, context: Any) -> Any:
        await context.abort(grpc_code(err.code), err.message)

    return deny


def _bind(streaming: bool, fn: Callable[..., Any], models: frozenset[str] | None) -> Callable[..., Any]:
    """``fn`` running with ALLOWED set to the token's models (each call is its own task)."""
    if streaming:
        async def bound_stream(request: Any, context: Any) -> Any:
            ALLOWED.set(models)
            async for item in fn(request, context):
                yield item

        return bound_stream

    async def bound(request: Any, context: Any) -> Any:
        ALLOWED.set(models)
        return await fn(request, context)

    return bound


# Open whatever auth_open says: the native edge's Hello (gateway/edge_api.py) reveals only key names
# and limits, and the edge must learn from it that tokens are on (it then relays every call).
ALWAYS_OPEN = ("ferry.edge.v1.Edge/Hello",)


def interceptors(settings: GatewaySettings) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    if not settings.auth_tokens_file:
        return []
    return [AuthInterceptor(TokenFile(Path(settings.auth_tokens_file)), [*settings.auth_open.split(","), *ALWAYS_OPEN])]


def new_token() -> tuple[str, str]:
    """A fresh random token and its SHA-256 hex digest (what the tokens file holds)."""
    import secrets

    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()
