"""Test fixtures: a real redis-server and a real Ferry cluster in child processes.

The pytest process talks to Ferry only as a client would (tritonclient over
gRPC, redis-py for inspecting Redis).  It never imports ``protos``, the
gateway or the workers: Ferry's generated protobuf modules and tritonclient's
define the same ``inference.*`` symbols and cannot share one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tritonclient.grpc as tc

from ferry.cluster import RedisServer, edge_binary, free_port, start_redis
from ferry.errors import ConfigError
from tests.models import full_repository

ROOT = Path(__file__).resolve().parent.parent
# Keys that legitimately outlive requests (see broker/keys.py); everything else is a leak.
STRUCTURAL = ("ferry:{m:", "ferry:{p:")


class Cluster:
    """Broker, worker(s) and gateway as separate processes against one Redis."""

    def __init__(self, repo: Path, logdir: Path, *, workers: int = 1, gateway_args: tuple[str, ...] = (),
                 broker_args: tuple[str, ...] = (), worker_args: tuple[tuple[str, ...], ...] = (),
                 client_args: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                 role_env: dict[str, dict[str, str]] | None = None, redis: RedisServer | None = None,
                 edge: bool = False) -> None:
        self.repo = repo
        self.role_env = role_env or {}  # extra environment per role, e.g. each its own Redis user
        # How a client reaches this gateway (TLS files for tritonclient) and the metadata it sends.
        self.client_args = client_args or {}
        self.headers = headers
        self.logdir = logdir
        self.redis: RedisServer = redis or start_redis()
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}
        self.env.update(FERRY_REDIS_URL=self.redis.url, FERRY_MODEL_REPOSITORY=str(repo), PYTHONUNBUFFERED="1",
                        FERRY_METRICS_PORT="0")
        try:
            self.spawn("broker", *broker_args)
            for _ in range(workers):
                self.spawn("worker")
            for args in worker_args:  # one more worker for each, e.g. ("--pool", "gpu")
                self.spawn("worker", *args)
            self.spawn("gateway", "--grpc-port", str(self.port), "--host", "127.0.0.1", *gateway_args)
            if edge:  # the native edge in front: clients reach the gateway through it
                self.gateway_url = self.url
                self.port = free_port()
                self.url = f"127.0.0.1:{self.port}"
                self.spawn_edge()
            self.wait_ready()
        except BaseException:
            self.close()  # the caller never gets the object, so nothing else would stop these
            raise

    def spawn_edge(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"edge-{len(self.procs)}.log", "wb")
        self.edge_metrics = f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen([edge_binary(), "--listen", self.url, "--upstream", self.gateway_url,
                                 "--metrics-listen", self.edge_metrics, *args],
                                env=self.env | self.role_env.get("edge", {}), stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)
        self.procs.append(("edge", proc))
        return proc

    def spawn(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{role}-{len(self.procs)}.log", "wb")
        env = self.env | self.role_env.get(role, {})
        proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", role, *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append((role, proc))
        return proc

    def logs(self) -> str:
        logs = sorted(self.logdir.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for role, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{role} exited with {p.returncode}\n{self.logs()}")
            try:
                if client.is_server_ready(headers=self.headers, client_timeout=1):
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"cluster not ready after {timeout_s}s\n{self.logs()}")

    def client(self) -> tc.InferenceServerClient:
        return tc.InferenceServerClient(self.url, **self.client_args)

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def stop_role(self, role: str, timeout_s: float = 30.0) -> list[int]:
        codes = []
        for r, p in self.procs:
            if r == role and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for r, p in self.procs:
            if r == role:
                try:
                    codes.append(p.wait(timeout_s))
                except subprocess.TimeoutExpired:
                    # Thread and task stacks into its log, for the failure message.
                    p.send_signal(signal.SIGUSR2)
                    time.sleep(0.5)
                    p.send_signal(signal.SIGUSR1)
                    time.sleep(0.5)
                    p.kill()
                    codes.append(p.wait())
        return codes

    def stop(self) -> dict[str, list[int]]:
        """Graceful stop in the order ``ferry up`` uses; returns exit codes by role."""
        codes = {role: self.stop_role(role) for role in ("edge", "gateway", "broker", "worker")}
        return codes

    def stop_ok(self) -> None:
        """Stop gracefully and assert that every process exited 0."""
        codes = self.stop()
        assert all(code == 0 for group in codes.values() for code in group), f"{codes}\n{self.logs()}"

    def stop_cleanly(self) -> None:
        """Stop gracefully and assert what every test's teardown wants: exit 0 everywhere, no leaked keys."""
        self.stop_ok()
        assert self.leaked_keys() == [], self.logs()

    def leaked_keys(self) -> list[str]:
        """Keys other than the structural streams/stats, plus non-empty streams or pending entries."""
        r = self.redis_client()
        leaks = []
        for key in r.scan_iter(count=1000):
            name = key.decode()
            if not name.startswith(STRUCTURAL):
                leaks.append(name)
                continue
            if r.type(key) == b"stream":
                if r.xlen(key):
                    leaks.append(f"{name} (length {r.xlen(key)})")
                for g in r.xinfo_groups(key):
                    if g["pending"]:
                        leaks.append(f"{name} group {g['name'].decode()} ({g['pending']} pending)")
        return leaks

    def close(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.redis.stop()


def require_edge() -> None:
    """Skip unless the native edge is built (scripts/test builds it, so CI runs these tests)."""
    try:
        edge_binary()
    except ConfigError as exc:
        pytest.skip(exc.message)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port; resumed first if the test stopped it (SIGSTOP)."""
    s = start_redis()
    try:
        yield s
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
        s.stop()


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return full_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cluster(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster per test module; its teardown proves a clean stop and no leaked keys."""
    c = Cluster(repo, tmp_path_factory.mktemp("logs"), gateway_args=("--max-message-bytes", "1048576"))
    try:
        yield c
        c.stop_cleanly()
    finally:
        c.close()
