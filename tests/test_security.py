"""TLS, mTLS, certificate rotation and token authentication, through real clients and a real cluster."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.certs import CA, Pem
from tests.conftest import Cluster
from tests.fuzz import call_unary

TOKEN_MLP = "tok-mlp-0123456789abcdef"
TOKEN_ALL = "tok-all-fedcba9876543210"
TOKEN_LATER = "tok-later-5555555555555555"


def _mlp_input() -> tc.InferInput:
    x = tc.InferInput("INPUT0", [1, 256], "FP32")
    x.set_data_from_numpy(np.ones((1, 256), np.float32))
    return x


def _entry(name: str, token: str, models: list[str]) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(), "models": models}


def _replace(path: Path, data: bytes) -> None:
    """Write as a rotation would: a whole new file moved into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tls(ca: Pem, client: Pem | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"ssl": True, "root_certificates": str(ca.cert)}
    if client is not None:
        args.update(private_key=str(client.key), certificate_chain=str(client.cert))
    return args


def _fails(url: str, **client_args: Any) -> str:
    client = tc.InferenceServerClient(url, **client_args)
    try:
        client.is_server_live(client_timeout=5)
    except InferenceServerException as exc:
        return str(exc)
    finally:
        client.close()
    raise AssertionError(f"a client with {client_args} reached the gateway")


@pytest.fixture
def stopping() -> Iterator[list[Cluster]]:
    """Clusters to stop cleanly (exit 0, no leaked keys) at the end of the test."""
    clusters: list[Cluster] = []
    try:
        yield clusters
        for c in clusters:
            c.stop_cleanly()
    finally:
        for c in clusters:
            c.close()


def test_mtls_admits_only_clients_with_a_certificate_from_the_ca(repo: Path, tmp_path: Path,
                                                                  stopping: list[Cluster]) -> None:
    ca, rogue_ca = CA(tmp_path, "ca"), CA(tmp_path, "rogue-ca")
    server = ca.issue(tmp_path, "gateway", server=True)
    client, rogue = ca.issue(tmp_path, "client", server=False), rogue_ca.issue(tmp_path, "rogue", server=False)
    c = Cluster(repo, tmp_path, client_args=_tls(ca.pem, client), gateway_args=(
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-client-ca-file", str(ca.pem.cert)))
    stopping.append(c)
    out = c.client().infer("mlp", [_mlp_input()], client_timeout=10).as_numpy("OUTPUT0")
    assert out is not None and out.shape == (1, 10)
    _fails(c.url)  # plaintext
    _fails(c.url, **_tls(ca.pem))  # TLS without a client certificate
    _fails(c.url, **_tls(ca.pem, rogue))  # a certificate from another CA
    _fails(c.url, **_tls(rogue_ca.pem, client))  # a client that does not trust the gateway's CA


def test_tls_certificate_rotates_without_a_restart(repo: Path, tmp_path: Path, stopping: list[Cluster]) -> None:
    old_ca, new_ca = CA(tmp_path, "old-ca"), CA(tmp_path, "new-ca")
    old, new = old_ca.issue(tmp_path, "old", server=True), new_ca.issue(tmp_path, "new", server=True)
    live = Pem(tmp_path / "tls.crt", tmp_path / "tls.key")
    live.cert.write_bytes(old.cert.read_bytes())
    live.key.write_bytes(old.key.read_bytes())
    c = Cluster(repo, tmp_path, client_args=_tls(old_ca.pem),
                gateway_args=("--tls-cert-file", str(live.cert), "--tls-key-file", str(live.key)))
    stopping.append(c)
    assert c.client().is_server_live(client_timeout=5)
    gateway_pid = next(p.pid for role, p in c.procs if role == "gateway")

    # Half a rotation (a new key, the old certificate) does not load: the old certificate stays in service.
    _replace(live.key, new.key.read_bytes())
    assert tc.InferenceServerClient(c.url, **_tls(old_ca.pem)).is_server_live(client_timeout=5)
    _replace(live.cert, new.cert.read_bytes())
    # Each new connection checks the files: the next one gets the new certificate.
    deadline = time.monotonic() + 10
    while True:
        client = tc.InferenceServerClient(c.url, **_tls(new_ca.pem))
        try:
            assert client.is_server_live(client_timeout=5)
            break
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise AssertionError(c.logs()) from None
        finally:
            client.close()
    _fails(c.url, **_tls(old_ca.pem))
    assert next(p.pid for role, p in c.procs if role == "gateway") == gateway_pid
    assert "TLS certificate reloaded" in c.logs()


@pytest.fixture
def authed(repo: Path, tmp_path: Path, stopping: list[Cluster]) -> Cluster:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [_entry("team-mlp", TOKEN_MLP, ["mlp"]),
                                             _entry("ops", TOKEN_ALL, ["*"])]}))
    c = Cluster(repo, tmp_path, headers={"authorization": f"Bearer {TOKEN_ALL}"},
                gateway_args=("--auth-tokens-file", str(tokens), "--log-level", "DEBUG"))
    stopping.append(c)
    return c


def _all_logs(c: Cluster) -> str:
    return "".join(p.read_text(errors="replace") for p in c.logdir.glob("*.log"))


def _error(fn: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


def test_tokens_gate_every_rpc_and_each_token_sees_only_its_models(authed: Cluster) -> None:
    client = authed.client()
    mlp_only = {"authorization": f"Bearer {TOKEN_MLP}"}

    err = _error(lambda: client.get_server_metadata())
    assert err.status() == "StatusCode.UNAUTHENTICATED" and "authorization: Bearer" in err.message()
    err = _error(lambda: client.infer("mlp", [_mlp_input()], headers={"authorization": "Bearer wrong"}))
    assert err.status() == "StatusCode.UNAUTHENTICATED" and "not valid" in err.message()
    err = _error(lambda: client.infer("mlp", [_mlp_input()], headers={"x-api-key": "wrong"}))
    assert err.status() == "StatusCode.UNAUTHENTICATED"

    out = client.infer("mlp", [_mlp_input()], headers=mlp_only).as_numpy("OUTPUT0")
    assert out is not None and out.shape == (1, 10)
    out = client.infer("mlp", [_mlp_input()], headers={"x-api-key": TOKEN_MLP}).as_numpy("OUTPUT0")
    assert out is not None

    # A model the token may not use and one that does not exist get the same answer.
    hidden = _error(lambda: client.get_model_metadata("identity", headers=mlp_only))
    missing = _error(lambda: client.get_model_metadata("no-such-model", headers=mlp_only))
    assert hidden.status() == missing.status() == "StatusCode.PERMISSION_DENIED"
    assert hidden.message().replace("identity", "X") == missing.message().replace("no-such-model", "X")
    assert _error(lambda: client.get_model_config("identity", headers=mlp_only)).status() == \
        "StatusCode.PERMISSION_DENIED"
    assert _error(lambda: client.get_inference_statistics("identity", headers=mlp_only)).status() == \
        "StatusCode.PERMISSION_DENIED"
    assert [m["name"] for m in client.get_model_repository_index(headers=mlp_only, as_json=True)["models"]] == ["mlp"]
    stats = client.get_inference_statistics(headers=mlp_only, as_json=True)["model_stats"]
    assert {s["name"] for s in stats} == {"mlp"}
    # The "*" token sees everything; a missing model is NOT_FOUND for it.
    assert len(client.get_model_repository_index(headers={"x-api-key": TOKEN_ALL}, as_json=True)["models"]) > 1
    err = _error(lambda: client.get_model_metadata("no-such-model", headers={"x-api-key": TOKEN_ALL}))
    assert err.status() == "StatusCode.NOT_FOUND"

    # Health stays open (auth_open's default), for probes and load balancers.
    with grpc.insecure_channel(authed.url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_streams_are_gated_by_the_token_too(authed: Cluster) -> None:
    results: queue.Queue[Any] = queue.Queue()
    client = authed.client()
    client.start_stream(lambda result, error: results.put(error or result),
                        headers={"authorization": f"Bearer {TOKEN_MLP}"})
    client.async_stream_infer("mlp", [_mlp_input()], request_id="ok")
    x = tc.InferInput("IN_FP32", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), np.float32))
    client.async_stream_infer("identity", [x], request_id="denied")
    got = [results.get(timeout=10), results.get(timeout=10)]
    client.stop_stream()
    errors = [g for g in got if isinstance(g, InferenceServerException)]
    oks = [g for g in got if not isinstance(g, InferenceServerException)]
    assert len(oks) == 1 and oks[0].get_response().id == "ok"
    assert len(errors) == 1 and "may not use model 'identity'" in errors[0].message()

    anonymous = authed.client()
    anonymous.start_stream(lambda result, error: results.put(error or result))
    try:
        anonymous.async_stream_infer("mlp", [_mlp_input()])
    except InferenceServerException:
        # The gateway refuses the stream on its metadata alone, so the refusal can
        # reach the client before this first request is queued; either way the
        # status arrives through the callback.
        pass
    err = results.get(timeout=10)
    anonymous.stop_stream()
    assert isinstance(err, InferenceServerException) and "UNAUTHENTICATED" in str(err.status())


def test_the_tokens_file_reloads_and_tokens_never_reach_the_logs(authed: Cluster, tmp_path: Path) -> None:
    client = authed.client()
    later = {"authorization": f"Bearer {TOKEN_LATER}"}
    assert _error(lambda: client.is_server_ready(headers=later)).status() == "StatusCode.UNAUTHENTICATED"
    tokens = tmp_path / "tokens.json"
    _replace(tokens, b"{not json")  # a broken edit: the old tokens stay
    deadline = time.monotonic() + 10
    while "does not load" not in _all_logs(authed):  # noticed at the first call a second or more later
        client.infer("mlp", [_mlp_input()], headers={"x-api-key": TOKEN_MLP})
        assert time.monotonic() < deadline, authed.logs()
    _replace(tokens, json.dumps({"tokens": [_entry("later", TOKEN_LATER, ["mlp"])]}).encode())
    deadline = time.monotonic() + 10
    while True:  # checked at most once a second
        try:
            assert client.is_server_ready(headers=later)
            break
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise AssertionError(authed.logs()) from None
    assert _error(lambda: client.is_server_ready(headers={"x-api-key": TOKEN_MLP})).status() == \
        "StatusCode.UNAUTHENTICATED"
    authed.headers = later  # for the fixture's stop
    logs = _all_logs(authed)
    assert "auth tokens reloaded" in logs
    for token in (TOKEN_MLP, TOKEN_ALL, TOKEN_LATER):
        assert token not in logs


def test_input_limits_name_the_knob_and_odd_names_and_shapes_are_plain_errors(repo: Path, tmp_path: Path,
                                                                              stopping: list[Cluster]) -> None:
    c = Cluster(repo, tmp_path, gateway_args=("--max-tensor-elements", "7", "--max-bytes-elements", "3"))
    stopping.append(c)
    client = c.client()

    def identity(dtype: str, rows: int) -> InferenceServerException:
        x = tc.InferInput(f"IN_{dtype}", [rows, 4], dtype)
        x.set_data_from_numpy(np.array([[b"ab"] * 4] * rows, dtype=object) if dtype == "BYTES"
                              else np.zeros((rows, 4), np.float32))
        return _error(lambda: client.infer("identity", [x]))

    err = identity("FP32", 2)  # 8 elements > 7
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "max_tensor_elements" in err.message(), err
    err = identity("BYTES", 1)  # 4 elements > 3
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "max_bytes_elements" in err.message(), err
    # Names are looked up among the loaded models, never used as paths.
    for name in ("../mlp", "mlp/../identity", "/etc/passwd"):
        assert _error(lambda n=name: client.get_model_metadata(n)).status() == "StatusCode.NOT_FOUND"
    # Dimensions whose product would overflow 64 bits are an error like any other shape mismatch.
    req = service_pb2.ModelInferRequest(model_name="identity")
    req.inputs.add(name="IN_FP32", datatype="FP32", shape=[1 << 62, 1 << 62])
    req.raw_input_contents.append(b"\0" * 16)
    with grpc.insecure_channel(c.url) as channel:
        assert call_unary(channel, req.SerializeToString()) == "INVALID_ARGUMENT"
