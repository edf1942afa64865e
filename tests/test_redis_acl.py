"""Each component logs in to a real redis-server as its own ACL user with broker.acl's rules, and needs no more.

The cluster serves requests, statistics, the repository index, a deadline rejection by the broker and a
worker's death (takeover by XCLAIM), then stops; Redis's ACL LOG must then be empty. A wrong password is
refused with Redis's WRONGPASS, and the password does not appear in the output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from broker.acl import RULES, rules
from ferry.cluster import RedisServer, find_redis_server, free_port, start_redis
from tests.certs import CA
from tests.conftest import ROOT, Cluster, require_edge

PASSWORD = "s3cret-for-tests"
WRONG = "pw-not-this-one-7731"


@pytest.fixture
def acl_redis() -> Iterator[tuple[RedisServer, str]]:
    server = start_redis()
    r = server.url.removesuffix("/0")
    client = redis.Redis.from_url(server.url)
    for role in RULES:
        client.execute_command("ACL", "SETUSER", f"ferry-{role}", "on", f">{PASSWORD}", *rules(role))
    client.execute_command("ACL", "LOG", "RESET")
    try:
        yield server, r
    finally:
        server.stop()


def _url(base: str, role: str, password: str = PASSWORD) -> str:
    return base.replace("redis://", f"redis://ferry-{role}:{password}@") + "/0"


def _role_env(base: str) -> dict[str, dict[str, str]]:
    """Each component as its own ACL user; the native edge as the gateway it stands in front of."""
    env = {role: {"FERRY_REDIS_URL": _url(base, role)} for role in RULES}
    env["edge"] = env["gateway"]
    return env


def _serve_twenty(client: tc.InferenceServerClient) -> tc.InferInput:
    """Twenty calls to the example model, each checked; their input, for more."""
    x = tc.InferInput("INPUT0", [2, 256], "FP32")
    x.set_data_from_numpy(np.ones((2, 256), np.float32))
    for _ in range(20):
        out = client.infer("mlp", [x], client_timeout=10).as_numpy("OUTPUT0")
        assert out is not None and out.shape == (2, 10)
    return x


def test_every_component_works_with_only_its_own_acl(repo: Path, tmp_path: Path,
                                                     acl_redis: tuple[RedisServer, str]) -> None:
    server, base = acl_redis
    c = Cluster(repo, tmp_path, redis=server, workers=0, worker_args=(("--fault-exit-on-id", "crash"),),
                broker_args=("--no-worker-grace-s", "60"),
                role_env=_role_env(base))
    admin = redis.Redis.from_url(server.url)
    try:
        client = c.client()
        x = _serve_twenty(client)
        assert client.get_inference_statistics("mlp", as_json=True)["model_stats"]
        assert client.get_model_repository_index(as_json=True)["models"]
        # The broker rejects what cannot make its deadline: its own replies to the gateway. (The slow
        # model takes 35-40 ms on a 2026 Xeon core, so the deadline is well under that.)
        slow = tc.InferInput("x", [1], "FP32")
        slow.set_data_from_numpy(np.ones((1,), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("slow", [slow], client_timeout=0.01)
        # A worker dies holding a batch; a new one takes it over (XPENDING, XCLAIM, DROP_CONSUMER).
        doomed = c.procs[-2][1]
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(lambda: client.infer("mlp", [x], request_id="crash", client_timeout=60))
            assert doomed.wait(20) == -9, "the fault did not kill the worker"
            c.spawn("worker")
            out = answer.result(60).as_numpy("OUTPUT0")
            assert out is not None and out.shape == (2, 10)
        c.procs = [(role, p) for role, p in c.procs if p is not doomed]
        assert "took over 1 batch(es) of dead workers" in c.logs()
        c.stop_ok()
        log = admin.execute_command("ACL", "LOG")
        assert log == [], f"ACL denials: {log}\n{c.logs()}"
    finally:
        c.close()


def test_the_edge_works_with_the_gateways_acl(repo: Path, tmp_path: Path,
                                             acl_redis: tuple[RedisServer, str]) -> None:
    """The native edge logs in as the gateway it stands in front of: its own ways of queueing (the
    ENQUEUE script for a queue it has not seen, a MULTI/EXEC transaction after) need nothing more."""
    require_edge()
    server, base = acl_redis
    c = Cluster(repo, tmp_path, redis=server, role_env=_role_env(base), edge=True)
    admin = redis.Redis.from_url(server.url)
    try:
        _serve_twenty(c.client())
        c.stop_ok()
        assert "took 20 inference calls" in c.logs(), c.logs()  # the edge queued them, not the gateway
        log = admin.execute_command("ACL", "LOG")
        assert log == [], f"ACL denials: {log}\n{c.logs()}"
        calls = admin.info("commandstats")
        assert calls["cmdstat_exec"]["calls"] >= 19, calls  # the first call goes through the script
    finally:
        c.close()


def test_an_edge_whose_acl_lacks_transactions_queues_through_the_script(repo: Path, tmp_path: Path,
                                                                      acl_redis: tuple[RedisServer, str]) -> None:
    """An ACL written before the edge used MULTI/EXEC: it says so at start and keeps to ENQUEUE."""
    require_edge()
    server, base = acl_redis
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "ferry-gateway", "-multi", "-exec")
    c = Cluster(repo, tmp_path, redis=server, role_env=_role_env(base), edge=True)
    try:
        admin.config_resetstat()
        _serve_twenty(c.client())
        c.stop_ok()
        assert "refused a transaction" in c.logs() and "took 20 inference calls" in c.logs(), c.logs()
        assert "cmdstat_exec" not in admin.info("commandstats")
        denied = {entry[b"object"] for entry in admin.execute_command("ACL", "LOG")}
        assert b"multi" in denied and denied <= {b"multi", b"exec"}, denied  # the probe at start, nothing after
    finally:
        c.close()


def test_a_wrong_password_is_refused_with_a_clear_message(repo: Path, tmp_path: Path,
                                                         acl_redis: tuple[RedisServer, str]) -> None:
    _, base = acl_redis
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}
    env |= {"FERRY_MODEL_REPOSITORY": str(repo),
            "FERRY_METRICS_PORT": "-1", "FERRY_REDIS_TIMEOUT_S": "1"}
    env["FERRY_REDIS_URL"] = _url(base, "broker", WRONG)
    proc = subprocess.run([sys.executable, "-m", "ferry.cli", "broker"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "WRONGPASS" in proc.stderr or "invalid username-password" in proc.stderr, proc.stderr[-2000:]
    assert WRONG not in proc.stderr, "the password reached the log"


def test_components_reach_redis_over_tls_as_their_acl_users(repo: Path, tmp_path: Path) -> None:
    """rediss:// with a private CA (ssl_ca_certs) and client certificates (Redis with tls-auth-clients yes),
    every component as its own user, nothing in plaintext."""
    ca = CA(tmp_path, "redis-ca")
    server_pem = ca.issue(tmp_path, "redis", server=True)
    client_pem = ca.issue(tmp_path, "ferry-client", server=False)
    plain, tls = free_port(), free_port()
    workdir = tempfile.TemporaryDirectory(prefix="ferry-redis-tls-")
    binary = find_redis_server()
    assert binary is not None
    proc = subprocess.Popen([binary, "--port", str(plain), "--bind", "127.0.0.1", "--save", "", "--dir", workdir.name,
                             "--tls-port", str(tls), "--tls-cert-file", str(server_pem.cert), "--tls-key-file",
                             str(server_pem.key), "--tls-ca-cert-file", str(ca.pem.cert), "--tls-auth-clients", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = RedisServer(proc, f"redis://127.0.0.1:{plain}/0", workdir)
    admin = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server with TLS did not start"
            time.sleep(0.05)
    for role in RULES:
        admin.execute_command("ACL", "SETUSER", f"ferry-{role}", "on", f">{PASSWORD}", *rules(role))
    url = (f"rediss://ferry-{{role}}:{PASSWORD}@127.0.0.1:{tls}/0?ssl_ca_certs={ca.pem.cert}"
           f"&ssl_certfile={client_pem.cert}&ssl_keyfile={client_pem.key}")
    c = Cluster(repo, tmp_path, redis=server, role_env={r: {"FERRY_REDIS_URL": url.format(role=r)} for r in RULES})
    try:
        x = tc.InferInput("INPUT0", [1, 256], "FP32")
        x.set_data_from_numpy(np.ones((1, 256), np.float32))
        out = c.client().infer("mlp", [x], client_timeout=10).as_numpy("OUTPUT0")
        assert out is not None and out.shape == (1, 10)
        clients = [dict(kv.split("=", 1) for kv in line.split(" ") if "=" in kv)
                   for line in admin.execute_command("CLIENT", "LIST").decode().splitlines()]
        ours = [cl for cl in clients if cl.get("user", "").startswith("ferry-")]
        assert {cl["user"] for cl in ours} == {f"ferry-{r}" for r in RULES}
        assert all(cl["laddr"].endswith(f":{tls}") for cl in ours), ours  # every connection over TLS
        # Without a client certificate that Redis refuses the handshake: the component says so and exits.
        bare = f"rediss://ferry-broker:{PASSWORD}@127.0.0.1:{tls}/0?ssl_ca_certs={ca.pem.cert}"
        proc = subprocess.run([sys.executable, "-m", "ferry.cli", "broker"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=c.env | {"FERRY_REDIS_URL": bare, "FERRY_REDIS_TIMEOUT_S": "1",
                                                       "FERRY_METRICS_PORT": "-1"})
        assert proc.returncode == 1 and PASSWORD not in proc.stderr, proc.stderr[-2000:]
        assert "UNAVAILABLE: Redis at" in proc.stderr and "CERTIFICATE_REQUIRED" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        c.stop_cleanly()
        assert admin.execute_command("ACL", "LOG") == []
    finally:
        c.close()
