"""Fault injection: a steady client load while workers, brokers, a gateway and Redis are killed.

    .venv/bin/python benchmarks/chaos.py                                  # 120 s, every fault
    .venv/bin/python benchmarks/chaos.py --duration-s 20 --json out.json  # the CI version (tests/test_chaos.py)
    .venv/bin/python benchmarks/chaos.py --faults none --duration-s 600   # soak: memory and keys over time

Starts its own cluster as separate processes: redis-server with AOF (appendfsync
everysec) on a fixed port and directory, two brokers, two CPU workers and two
gateways, serving ``plus_one`` (y = x + 1, FP32 [batch, 2]), whose every answer can
be checked.  Clients send unary ModelInfer calls at ``--rate`` per second (open loop,
alternating between the gateways) and ModelStreamInfer requests at ``--stream-rate``
(streams of ``--stream-len`` requests), each with a unique input and a deadline of
``--deadline-s``.  Every ``--interval-s`` one fault from ``--faults`` is injected, in
turn, and the process is restarted as a supervisor (Kubernetes) would:

* ``kill-worker``, ``kill-broker``: SIGKILL one, start a new one;
* ``kill-gateway``: SIGKILL one gateway, start it again on its port (its clients see
  UNAVAILABLE meanwhile);
* ``restart-redis``: SIGKILL redis-server and start it again on its AOF (up to one
  second of writes may be lost: docs/reliability.md);
* ``sentinel-failover``: with ``--sentinel``, Redis runs as a primary, a replica and
  three Sentinels, Ferry connects through the Sentinels, and the fault is SENTINEL
  FAILOVER (a planned switch-over: for a second both servers take writes);
* ``kill-primary``: with ``--sentinel``, SIGKILL the primary; the Sentinels notice
  (down-after 1 s) and promote the replica; the old primary is started again and
  rejoins as a replica;
* ``kill-cluster-primary``: with ``--cluster`` (a Redis Cluster of three primaries and
  three replicas), SIGKILL a primary; its replica takes over (node timeout 1 s) and the
  old one rejoins as a replica;
* ``cut-link``: with ``--netns`` (root), Redis runs in a network namespace of its own
  and its link is cut (``ip link set down``) for ``--cut-s``, then restored: TCP
  stalls, nothing is reset, every client must notice by its own timeouts.

Every request ends as one of: OK with the right answer; OK with a wrong answer; an
error status (counted by code) within its deadline (plus ``--slack-s`` for the client's
own scheduling); an error after that; never answered (no end ``--deadline-s +
--drain-s`` after sending); answered more than once (a stream can show it).  The bar:
0 wrong, 0 late, 0 never answered, 0 twice, and 0 *expired*: DEADLINE_EXCEEDED with a
deadline (10 s) well above the time Ferry takes to recover from any one fault (~5 s)
means a fault lost the request and the gateway timed it out.  Every ``--sample-s`` it also records the
resident memory of every Ferry process and Redis's used memory and key count, to show
state stays bounded.  Exit code 0 when the bar is met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis
import tritonclient.grpc.aio as tca
from onnx import TensorProto, helper, numpy_helper, save_model
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.reclaim import FORGOTTEN_IDLE_MS  # noqa: E402
from ferry.cluster import find_redis_server, free_port  # noqa: E402

FAULTS = ("kill-worker", "kill-broker", "kill-gateway", "restart-redis", "sentinel-failover", "kill-primary",
          "cut-link", "kill-cluster-primary")
MODEL = "plus_one"


def write_model(root: Path) -> Path:
    one = numpy_helper.from_array(np.ones((2,), dtype=np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / MODEL / "1").mkdir(parents=True)
    save_model(model, str(root / MODEL / "1" / "model.onnx"))
    (root / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nmax_batch_size: 16\n')
    return root


class Redis:
    """redis-server with AOF on a fixed port and directory, so that a restart finds its data;
    or, with sentinel, a primary, a replica and three Sentinels; or, with cluster, a Redis
    Cluster of three primaries with a replica each."""

    def __init__(self, workdir: Path, sentinel: bool, netns: bool = False, cluster: bool = False) -> None:
        binary = find_redis_server()
        if binary is None:
            raise SystemExit("no redis-server: apt-get install redis-server")
        self.binary = binary
        self.workdir = workdir
        self.sentinel = sentinel
        self.cluster = cluster
        self.ports = _distinct_ports(6 if cluster else 2 if sentinel else 1, cluster)
        self.sentinel_ports = _distinct_ports(3, False, avoid=self.ports) if sentinel else []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.host = "127.0.0.1"
        self.cut_s = 3.0
        self.netns = Netns() if netns else None
        if self.netns is not None:
            self.host = self.netns.inside
        try:
            for i, port in enumerate(self.ports):
                self._start_server(port, replica_of=self.ports[0] if i and sentinel else None)
            for port in self.sentinel_ports:
                self._start_sentinel(port)
            if sentinel:
                self._wait_sentinels_ready()
            if cluster:
                subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True)
                self._wait_cluster_ok()
        except BaseException:
            self.stop()
            raise

    def _wait_sentinels_ready(self, timeout_s: float = 30) -> None:
        """Until every Sentinel knows a replica in sync and the other Sentinels (found through the
        primary, every few seconds): before that, a failover has nothing safe to promote."""
        deadline = time.monotonic() + timeout_s
        for port in self.sentinel_ports:
            r = redis.Redis(port=port)
            while True:
                replicas = r.sentinel_slaves("ferry")
                others = r.sentinel_sentinels("ferry")
                # A replica still in its first sync would be promoted with part of the data: wait
                # until its link to the primary is up (master-link-status ok), as an operator would.
                healthy = [x for x in replicas if not x.get("is_sdown") and not x.get("is_disconnected")
                           and x.get("master-link-status") == "ok"]
                if healthy and len(others) == len(self.sentinel_ports) - 1:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Sentinel {port} found no replica / peers within {timeout_s} s")
                time.sleep(0.2)

    @property
    def url(self) -> str:
        if self.sentinel:
            hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
            return f"redis+sentinel://{hosts}/ferry/0"
        if self.cluster:
            return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])
        return f"redis://{self.host}:{self.ports[0]}/0"

    def _start_server(self, port: int, replica_of: int | None = None) -> None:
        d = self.workdir / f"redis-{port}"
        d.mkdir(exist_ok=True)
        wrap = ["ip", "netns", "exec", self.netns.name] if self.netns else []
        args = [*wrap, self.binary, "--port", str(port), "--bind", self.host, "--protected-mode", "no",
                "--dir", str(d), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                     "--cluster-node-timeout", "1000"]
        if replica_of is not None and not (d / "appendonlydir").exists():
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        _wait_ping(port, self.host)

    def _start_sentinel(self, port: int) -> None:
        conf = self.workdir / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor ferry 127.0.0.1 {self.ports[0]} 2\n"
                        "sentinel down-after-milliseconds ferry 1000\nsentinel failover-timeout ferry 5000\n")
        self.procs[port] = subprocess.Popen([self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_ping(port)

    def primary_port(self) -> int:
        if not self.sentinel:
            return self.ports[0]
        r = redis.Redis(port=self.sentinel_ports[0])
        return int(r.execute_command("SENTINEL", "get-master-addr-by-name", "ferry")[1])

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.primary_port())

    def clients(self) -> list[redis.Redis]:
        """One client per primary (the whole keyspace)."""
        if not self.cluster:
            return [self.client()]
        return [redis.Redis(port=p) for p in self.cluster_primaries()]

    def cluster_primaries(self) -> list[int]:
        for port in self.ports:
            if self.procs[port].poll() is not None:
                continue
            with contextlib.suppress(redis.exceptions.RedisError):
                nodes = redis.Redis(port=port, socket_timeout=1).execute_command("CLUSTER", "NODES").decode()
                return [int(line.split()[1].split(":")[1].split("@")[0]) for line in nodes.splitlines()
                        if "master" in line.split()[2] and "fail" not in line.split()[2]
                        and len(line.split()) > 8]
        raise RuntimeError("no cluster node answers")

    def _wait_cluster_ok(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            if self.procs[port].poll() is not None:
                continue
            while b"cluster_state:ok" not in redis.Redis(port=port).execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {port} not ok within {timeout_s} s")
                time.sleep(0.1)

    def kill_cluster_primary(self, rng: random.Random) -> int:
        """SIGKILL a primary; its replica takes over (node timeout 1 s); the old one rejoins as a replica."""
        victim = rng.choice(self.cluster_primaries())
        self.procs[victim].kill()
        self.procs[victim].wait()
        deadline = time.monotonic() + 30
        while victim in self.cluster_primaries() or len(self.cluster_primaries()) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not fail over within 30 s")
            time.sleep(0.05)
        self._wait_cluster_ok()
        self._start_server(victim)
        return victim

    def cut(self, seconds: float) -> None:
        assert self.netns is not None
        self.netns.link(False)
        time.sleep(seconds)
        self.netns.link(True)

    def restart(self) -> None:
        port = self.primary_port()
        self.procs[port].kill()
        self.procs[port].wait()
        self._start_server(port)

    def failover(self) -> None:
        self._wait_sentinels_ready()  # the replica (the old primary, after a failover) is known again
        r = redis.Redis(port=self.sentinel_ports[0])
        old = self.primary_port()
        r.execute_command("SENTINEL", "FAILOVER", "ferry")
        deadline = time.monotonic() + 20
        while self.primary_port() == old:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinels did not fail over within 20 s: {r.sentinel_master('ferry')}, "
                                   f"replicas {r.sentinel_slaves('ferry')}")
            time.sleep(0.05)

    def kill_primary(self) -> None:
        old = self.primary_port()
        self.procs[old].kill()
        self.procs[old].wait()
        deadline = time.monotonic() + 30
        while self.primary_port() == old:
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not promote the replica within 30 s")
            time.sleep(0.05)
        # Back as a replica of the new primary (the Sentinels would also reconfigure it).
        (self.workdir / f"redis-{old}" / "appendonlydir").exists() and shutil.rmtree(
            self.workdir / f"redis-{old}" / "appendonlydir")
        self._start_server(old, replica_of=self.primary_port())

    def stop(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
        if self.netns is not None:
            self.netns.delete()


class Netns:
    """A network namespace joined to this one by a veth pair, so that Redis's link can be cut
    (``ip link set ... down``: packets vanish, TCP stalls, nothing is reset).  Needs root."""

    def __init__(self) -> None:
        tag = os.getpid() % 250
        self.name = f"ferry-chaos-{os.getpid()}"
        self.outside, self.inside = f"10.231.{tag}.1", f"10.231.{tag}.2"
        self.veth = f"fc{os.getpid() % 100000}"
        for cmd in (["ip", "netns", "add", self.name],
                    ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", self.veth + "p"],
                    ["ip", "link", "set", self.veth + "p", "netns", self.name],
                    ["ip", "addr", "add", f"{self.outside}/30", "dev", self.veth],
                    ["ip", "link", "set", self.veth, "up"],
                    ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.inside}/30", "dev",
                     self.veth + "p"],
                    ["ip", "netns", "exec", self.name, "ip", "link", "set", self.veth + "p", "up"],
                    ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True)

    def link(self, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.veth, "up" if up else "down"], check=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)


def _distinct_ports(n: int, cluster: bool, avoid: list[int] | None = None) -> list[int]:
    """``n`` free ports, none repeated and none another's cluster-bus port: a free port is free only
    until someone binds it, and picking one at a time can return the same port twice (a node then
    fails to start, which a run once did)."""
    taken = set(avoid or ())
    out: list[int] = []
    while len(out) < n:
        port = _cluster_port() if cluster else free_port()
        mine = {port, port + 10000} if cluster else {port}
        if mine & taken or (cluster and port - 10000 in taken):
            continue
        taken |= mine
        out.append(port)
    return out


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is valid and free too."""
    import socket

    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port + 10000))
            return port


def _wait_ping(port: int, host: str = "127.0.0.1", timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if redis.Redis(host=host, port=port, socket_timeout=0.5).ping():
                return
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis on port {port} did not start")
        time.sleep(0.05)


class Ferry:
    """Brokers, workers and gateways as child processes, restarted when killed."""

    def __init__(self, redis_url: str, repo: Path, logdir: Path, settings: dict[str, str] | None = None) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "REDIS_URL"}
        self.env.update(FERRY_REDIS_URL=redis_url, FERRY_MODEL_REPOSITORY=str(repo), PYTHONUNBUFFERED="1",
                        FERRY_METRICS_PORT="0")
        self.env.update(settings or {})
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway_ports = [free_port(), free_port()]
        self.started = Counter[str]()
        for name in ("broker-0", "broker-1", "worker-0", "worker-1"):
            self.start(name)
        for i in range(2):
            self.start(f"gateway-{i}")

    def start(self, name: str) -> None:
        role, index = name.split("-")
        args = [sys.executable, "-m", "ferry.cli", role]
        if role == "gateway":
            args += ["--grpc-port", str(self.gateway_ports[int(index)]), "--host", "127.0.0.1"]
        self.started[name] += 1
        log = open(self.logdir / f"{name}.{self.started[name]}.log", "wb")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def kill(self, role: str, rng: random.Random) -> str:
        name = rng.choice(sorted(n for n in self.procs if n.startswith(role)))
        self.procs[name].kill()
        self.procs[name].wait()
        return name

    def stop(self) -> dict[str, int | None]:
        """SIGTERM in the order `ferry up` uses; exit codes by process."""
        codes: dict[str, int | None] = {}
        for role in ("gateway", "broker", "worker"):
            group = {n: p for n, p in self.procs.items() if n.startswith(role)}
            for p in group.values():
                p.send_signal(signal.SIGTERM)
            for n, p in group.items():
                try:
                    codes[n] = p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes[n] = None
        return codes

    def rss_kib(self) -> dict[str, int]:
        out = {}
        for n, p in self.procs.items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[n] = int(line.split()[1])
        return out


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    wrong: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # in time, by status
    late: int = 0  # an error after deadline + slack
    never: int = 0
    twice: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # one error message per status
    faults: list[tuple[float, str]] = field(default_factory=list)
    samples: list[dict[str, object]] = field(default_factory=list)

    def bar_met(self) -> bool:
        return (self.wrong == 0 and self.late == 0 and self.never == 0 and self.twice == 0 and self.expired == 0
                and self.ok > 0)

    @property
    def expired(self) -> int:
        """Requests that got DEADLINE_EXCEEDED: with a deadline well above the time Ferry takes to
        recover from a fault (~5 s), these are requests a fault lost and the gateway timed out."""
        return self.failed["DEADLINE_EXCEEDED"] + self.failed["stream: no answer from model"]


def _inputs(value: float) -> list[tca.InferInput]:
    x = tca.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[value, -value]], dtype=np.float32))
    return [x]


def _right(result: object, value: float) -> bool:
    y = result.as_numpy("y")  # type: ignore[attr-defined]
    return bool(y.shape == (1, 2) and y[0, 0] == np.float32(value) + 1 and y[0, 1] == np.float32(-value) + 1)


class Load:
    def __init__(self, args: argparse.Namespace, ports: list[int], tally: Tally) -> None:
        self.args = args
        self.clients = [tca.InferenceServerClient(f"127.0.0.1:{p}") for p in ports]
        self.tally = tally
        self.values = itertools.count(1)
        self.tasks: set[asyncio.Task[None]] = set()

    def _status(self, exc: Exception, started: float, limit_s: float | None = None) -> None:
        """Count an error answer; ``limit_s``: its deadline, from ``started`` (default --deadline-s)."""
        limit_s = self.args.deadline_s if limit_s is None else limit_s
        if time.monotonic() - started > limit_s + self.args.slack_s:
            self.tally.late += 1
            return
        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code().name
        elif exc.status() is not None:  # type: ignore[attr-defined]
            code = str(exc.status()).removeprefix("StatusCode.")  # type: ignore[attr-defined]
        else:
            # An error answer on a stream (error_message) carries no code: Ferry starts the
            # message with it.
            code = "stream: " + str(exc.message()).split(":")[0][:40]  # type: ignore[attr-defined]
        self.tally.failed[code] += 1
        self.tally.examples.setdefault(code, str(exc)[:300])

    async def unary(self, client: tca.InferenceServerClient) -> None:
        value = float(next(self.values))
        self.tally.sent += 1
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(
                client.infer(MODEL, _inputs(value), request_id=f"u{int(value)}", client_timeout=self.args.deadline_s),
                self.args.deadline_s + self.args.drain_s)
        except TimeoutError:
            self.tally.never += 1
            return
        except InferenceServerException as exc:
            self._status(exc, started)
            return
        if _right(result, value):
            self.tally.ok += 1
        else:
            self.tally.wrong += 1

    async def stream(self, client: tca.InferenceServerClient) -> None:
        """One stream of --stream-len requests; each must be answered exactly once."""
        args = self.args
        values = [float(next(self.values)) for _ in range(args.stream_len)]
        answered: Counter[str] = Counter()  # OK answers by request id
        errors = 0  # error answers: tritonclient does not say which request they belong to
        sent = 0
        started = time.monotonic()

        async def requests():  # type: ignore[no-untyped-def]
            nonlocal sent
            for v in values:
                self.tally.sent += 1
                sent += 1
                yield {"model_name": MODEL, "inputs": _inputs(v), "request_id": f"s{int(v)}"}
                await asyncio.sleep(1 / args.stream_rate)

        budget = args.stream_len / args.stream_rate + args.deadline_s
        ended_with: Exception | None = None
        try:
            async with asyncio.timeout(budget + args.drain_s):
                async for result, error in client.stream_infer(requests(), stream_timeout=budget):
                    if error is not None:
                        errors += 1
                        self._status(error, started, budget)
                        continue
                    rid = result.get_response().id
                    answered[rid] += 1
                    if answered[rid] == 1:
                        if _right(result, float(rid[1:])):
                            self.tally.ok += 1
                        else:
                            self.tally.wrong += 1
        except TimeoutError:
            pass  # what is unanswered now was never answered
        except (InferenceServerException, grpc.aio.AioRpcError) as exc:
            ended_with = exc  # the stream itself ended (gateway killed, stream deadline)
        self.tally.twice += sum(n - 1 for n in answered.values())
        unanswered = sent - len(answered) - errors
        if unanswered < 0:  # more error answers than requests left: some request was answered twice
            self.tally.twice += -unanswered
        elif ended_with is not None:
            for _ in range(unanswered):  # every unanswered request got the stream's final status
                self._status(ended_with, started, budget)
        else:
            self.tally.never += unanswered

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, until: float) -> None:
        rng = random.Random(self.args.seed)
        turn = itertools.count()
        next_stream = time.monotonic()
        while time.monotonic() < until:
            client = self.clients[next(turn) % len(self.clients)]
            self.spawn(self.unary(client))
            if self.args.stream_rate and time.monotonic() >= next_stream:
                self.spawn(self.stream(client))
                next_stream += self.args.stream_len / self.args.stream_rate
            await asyncio.sleep(rng.expovariate(self.args.rate))
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        for c in self.clients:
            await c.close()


async def inject(args: argparse.Namespace, ferry: Ferry, store: Redis, tally: Tally, until: float,
                 t0: float) -> None:
    rng = random.Random(args.seed + 1)
    faults = [f for f in args.faults.split(",") if f and f != "none"]
    turn = 0
    loop = asyncio.get_running_loop()
    next_sample = time.monotonic()
    next_fault = time.monotonic() + args.interval_s
    while time.monotonic() < until:
        now = time.monotonic()
        if now >= next_sample:
            tally.samples.append(await loop.run_in_executor(None, sample, ferry, store, now - t0))
            next_sample += args.sample_s
        if faults and now >= next_fault and now + args.interval_s / 2 < until:
            fault = faults[turn % len(faults)]
            turn += 1
            what = await loop.run_in_executor(None, apply_fault, fault, ferry, store, rng)
            tally.faults.append((round(now - t0, 1), what))
            print(f"{now - t0:7.1f}s {what}", flush=True)
            next_fault += args.interval_s
        await asyncio.sleep(0.1)


def apply_fault(fault: str, ferry: Ferry, store: Redis, rng: random.Random) -> str:
    if fault in ("kill-worker", "kill-broker", "kill-gateway"):
        name = ferry.kill(fault.removeprefix("kill-"), rng)
        time.sleep(0.5)  # a supervisor's restart delay
        ferry.start(name)
        return f"SIGKILL {name}, restarted"
    if fault == "restart-redis":
        store.restart()
        return "SIGKILL redis-server, restarted on its AOF"
    if fault == "sentinel-failover":
        store.failover()
        return f"Sentinel failover, primary now on port {store.primary_port()}"
    if fault == "cut-link":
        store.cut(store.cut_s)
        return f"Redis link cut for {store.cut_s:.1f} s, restored"
    if fault == "kill-cluster-primary":
        port = store.kill_cluster_primary(rng)
        return f"SIGKILL cluster primary {port}; its replica took over; it rejoined as a replica"
    if fault == "kill-primary":
        store.kill_primary()
        return f"SIGKILL the primary; Sentinels promoted port {store.primary_port()}; old primary back as replica"
    raise SystemExit(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}, none")


def sample(ferry: Ferry, store: Redis, at: float) -> dict[str, object]:
    out: dict[str, object] = {"at_s": round(at, 1), "rss_kib": ferry.rss_kib()}
    with contextlib.suppress(redis.exceptions.RedisError, RuntimeError):
        clients = store.clients()
        out["redis_used_memory"] = sum(int(r.info("memory")["used_memory"]) for r in clients)
        out["redis_keys"] = sum(int(r.dbsize()) for r in clients)
    return out


def report(tally: Tally, args: argparse.Namespace, codes: dict[str, int | None], leaks: list[str]) -> str:
    lines = [
        f"load: {args.rate}/s unary + {args.stream_rate}/s streamed for {args.duration_s:.0f} s, deadline "
        f"{args.deadline_s} s; faults every {args.interval_s} s: {args.faults}",
        f"faults injected: {len(tally.faults)} ({', '.join(Counter(w.split(',')[0] for _, w in tally.faults))})",
        f"sent {tally.sent}: OK {tally.ok}, failed with a status in time {sum(tally.failed.values())} "
        f"({', '.join(f'{k} {v}' for k, v in tally.failed.most_common()) or 'none'}), "
        f"late {tally.late}, never answered {tally.never}, answered twice {tally.twice}, wrong {tally.wrong}",
        *(f"  e.g. {code}: {text}" for code, text in tally.examples.items()),
        f"exit codes on SIGTERM: {codes}",
        f"keys left after the stop: {leaks or 'none'}",
    ]
    if tally.samples:
        first, last = tally.samples[0], tally.samples[-1]
        lines.append(f"memory: first sample {first}, last {last}")
    lines.append(f"expired (DEADLINE_EXCEEDED: lost by a fault, then timed out by the gateway): {tally.expired}")
    lines.append("bar (0 wrong, 0 late, 0 never, 0 twice, 0 expired): " + ("MET" if tally.bar_met() else "NOT MET"))
    return "\n".join(lines)


def settle(store: Redis) -> None:
    """Before stopping: give the cluster what it needs to finish on its own. A batch whose worker's
    acknowledgement a failover lost (asynchronous replication) is claimed back and run again once
    it has been idle FORGOTTEN_IDLE_MS; stopping sooner would leave it for the next start, which
    the leak check below cannot tell from a real leak. Returns as soon as nothing is left."""
    deadline = time.monotonic() + FORGOTTEN_IDLE_MS / 1000 + 3
    while time.monotonic() < deadline and _unfinished(store):
        time.sleep(0.2)


def _unfinished(store: Redis) -> bool:
    for r in store.clients():
        for key in r.scan_iter(match="ferry:*", count=1000, _type="stream"):
            if key.endswith(b":dead"):  # dead letters stay by design
                continue
            if r.xlen(key) or any(g["pending"] for g in r.xinfo_groups(key)):
                return True
    return False


def leftover_keys(store: Redis) -> list[str]:
    """Keys that will not go away on their own: non-empty streams, entries still pending, and
    keys without a TTL other than the statistics hashes.  (A killed gateway's keys expire.)"""
    out = []
    for r, key in ((c, k) for c in store.clients() for k in c.scan_iter(count=1000)):
        name = key.decode()
        kind = r.type(key)
        if r.pttl(key) > 0:
            continue
        if kind == b"stream":
            groups = r.xinfo_groups(key)
            if r.xlen(key) or any(g["pending"] for g in groups):
                # Enough to tell a lost acknowledgement (pending) from an entry no group will deliver.
                where = ", ".join(f"group {g['name'].decode()}: {g['pending']} pending, last delivered "
                                  f"{g['last-delivered-id'].decode()}" for g in groups)
                ids = [e[0].decode() for e in r.xrange(key, count=3)]
                out.append(f"{name} (length {r.xlen(key)}; entries {ids}; {where})")
        elif kind == b"zset":
            # A registry (ferry:workers, ferry:brokers) member expires on its own within one
            # heartbeat TTL (3 s) and is pruned by the next heartbeat or read; after a failover
            # a stopped process's removal may have gone to the old primary.  Only a member that
            # outlives that would be kept forever.
            if r.zcount(key, int(time.time() * 1000) + 3_500, "+inf"):
                out.append(name)
        elif kind != b"hash":  # the statistics hash stays by design
            out.append(name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=100.0, help="unary requests per second (Poisson)")
    ap.add_argument("--stream-rate", type=float, default=20.0, help="streamed requests per second (0: none)")
    ap.add_argument("--stream-len", type=int, default=40, help="requests per stream")
    ap.add_argument("--deadline-s", type=float, default=10.0, help="each request's deadline")
    ap.add_argument("--slack-s", type=float, default=1.0, help="an error this long after the deadline is late")
    ap.add_argument("--drain-s", type=float, default=10.0, help="after its deadline, a request is never answered")
    ap.add_argument("--faults", default="kill-worker,kill-broker,kill-gateway,restart-redis",
                    help=f"comma-separated, injected in turn: {', '.join(FAULTS)}; 'none' for a soak")
    ap.add_argument("--interval-s", type=float, default=5.0, help="seconds between faults")
    ap.add_argument("--sentinel", action="store_true", help="Redis as primary + replica + 3 Sentinels")
    ap.add_argument("--set", action="append", default=[], metavar="FERRY_KNOB=VALUE",
                    help="a setting for every Ferry process (repeatable), e.g. FERRY_REDIS_TIMEOUT_S=5")
    ap.add_argument("--cluster", action="store_true", help="Redis Cluster: 3 primaries + 3 replicas")
    ap.add_argument("--netns", action="store_true", help="Redis in a network namespace of its own (root)")
    ap.add_argument("--cut-s", type=float, default=3.0, help="how long cut-link cuts the link")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the counts and samples here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    args = ap.parse_args()
    if ("sentinel-failover" in args.faults or "kill-primary" in args.faults) and not args.sentinel:
        ap.error("sentinel-failover and kill-primary need --sentinel")
    if "cut-link" in args.faults and not args.netns:
        ap.error("cut-link needs --netns")
    if args.netns + args.sentinel + args.cluster > 1:
        ap.error("--netns, --sentinel and --cluster do not combine (yet)")
    if "kill-cluster-primary" in args.faults and not args.cluster:
        ap.error("kill-cluster-primary needs --cluster")

    work = Path(tempfile.mkdtemp(prefix="ferry-chaos-"))
    store = Redis(work, args.sentinel, args.netns, args.cluster)
    store.cut_s = args.cut_s
    repo = write_model(work / "models")
    logs = work / "logs"
    logs.mkdir()
    tally = Tally()
    codes: dict[str, int | None] = {}
    leaks: list[str] = []
    ferry: Ferry | None = None
    try:
        ferry = Ferry(store.url, repo, logs, dict(kv.split("=", 1) for kv in args.set))
        _wait_ready(ferry)
        t0 = time.monotonic()
        until = t0 + args.duration_s

        async def run() -> None:
            load = Load(args, ferry.gateway_ports, tally)
            await asyncio.gather(load.run(until), inject(args, ferry, store, tally, until, t0))
            tally.samples.append(sample(ferry, store, time.monotonic() - t0))

        asyncio.run(run())
        settle(store)
        codes = ferry.stop()
        leaks = leftover_keys(store)
    finally:
        for p in ferry.procs.values() if ferry else ():
            if p.poll() is None:
                p.kill()
        store.stop()
    text = report(tally, args, codes, leaks)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({**asdict(tally), "failed": dict(tally.failed), "codes": codes,
                                         "leaks": leaks, "bar_met": tally.bar_met(),
                                         "expired": tally.expired}, indent=1))
    if args.keep_logs:
        print(f"logs: {logs}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if tally.bar_met() and not leaks and all(c == 0 for c in codes.values()) else 1


def _wait_ready(ferry: Ferry, timeout_s: float = 60) -> None:
    import tritonclient.grpc as tc

    deadline = time.monotonic() + timeout_s
    for port in ferry.gateway_ports:
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        while True:
            for n, p in ferry.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{n} exited with {p.returncode} before the cluster was ready")
            with contextlib.suppress(Exception):
                if client.is_server_ready(client_timeout=1):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
