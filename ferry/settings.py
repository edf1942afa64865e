"""One frozen, validated settings object per process, built at the edge.

Each field is a knob with a flag (``--grpc-port``), an environment variable
(``FERRY_GRPC_PORT``; the Redis URL also reads ``REDIS_URL``) and a default,
in that order of precedence.  The CLI's ``--help`` is generated from the
``help`` metadata below, so every knob is documented where it is used.  An
unknown ``FERRY_*`` variable is an error: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ferry.errors import ConfigError
from ferry.redis_url import parse as parse_redis_url

ENV_PREFIX = "FERRY_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def knob(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _instance_id() -> str:
    return f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class CommonSettings:
    DEFAULT_METRICS_PORT: ClassVar[int] = -1

    redis_url: str = knob(
        DEFAULT_REDIS_URL, "Redis URL: redis://, rediss://, unix:///path?db=N, "
        "redis+sentinel://host:port[,host:port...]/service[/db] or redis+cluster://host:port[,host:port...] "
        "(see docs/reliability.md); also read from REDIS_URL"
    )
    model_repository: Path = knob(
        Path("models"), "model repository: <repo>/<model>/config.pbtxt and <repo>/<model>/<version>/model.onnx"
    )
    redis_timeout_s: float = knob(2.0, "seconds to wait for Redis to connect or answer before UNAVAILABLE")
    log_level: str = knob("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_json: bool = knob(False, "log one JSON object per line instead of text")
    grace_s: float = knob(
        20.0, "on SIGTERM, seconds to finish in-flight work before exiting (keep below "
        "Kubernetes' terminationGracePeriodSeconds)"
    )
    no_worker_grace_s: float = knob(
        2.0, "gateway and broker: how long requests of a model are accepted and wait while none of its pools "
        "has a live worker (a worker restarting; raise it, e.g. to 180, for pools that scale from zero) before "
        "they fail with UNAVAILABLE; the clock starts with the first waiting request. Batches on a pool that lost "
        "every worker move to another pool of their model at once"
    )
    metrics_port: int = knob(
        -2, "HTTP port of this process's Prometheus /metrics (0: any free port, logged; -1: off; "
        "default: 8002 for a gateway, as Triton, 8003 for a broker, 8004 for a worker)"
    )
    metrics_host: str = knob("0.0.0.0", "address the /metrics HTTP server binds")
    otlp_endpoint: str = knob(
        "", "OpenTelemetry collector (OTLP/gRPC, e.g. http://otel-collector:4317) to send traces to; empty = "
        "tracing off (needs the tracing extra: pip install 'ferry-serve[tracing]')"
    )
    trace_sample_ratio: float = knob(
        1.0, "share of new traces sampled (0-1); a request whose client sent a traceparent follows its decision"
    )

    def __post_init__(self) -> None:
        parse_redis_url(self.redis_url)  # ConfigError naming what is wrong
        if self.redis_timeout_s <= 0:
            raise ConfigError("redis_timeout_s must be > 0")
        if self.grace_s < 0:
            raise ConfigError("grace_s must be >= 0")
        if self.no_worker_grace_s < 0:
            raise ConfigError("no_worker_grace_s must be >= 0")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ConfigError("trace_sample_ratio must be between 0 and 1")
        if not -2 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is not a TCP port (0: any free port, -1: off)")
        if self.metrics_port == -2:
            object.__setattr__(self, "metrics_port", self.DEFAULT_METRICS_PORT)
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} must be DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class GatewaySettings(CommonSettings):
    DEFAULT_METRICS_PORT: ClassVar[int] = 8002

    host: str = knob("0.0.0.0", "address the gRPC server binds")
    grpc_port: int = knob(8001, "gRPC port (8001, as Triton); 0 picks a free port")
    max_message_bytes: int = knob(64 * 1024 * 1024, "largest request message accepted (RESOURCE_EXHAUSTED beyond)")
    request_timeout_s: float = knob(
        60.0, "longest a request may wait for its answer when the client sets no deadline (DEADLINE_EXCEEDED)"
    )
    gateway_id: str = knob("", "unique id of this gateway in Redis (default: host-pid-random)")
    max_inflight: int = knob(
        16384, "most requests this gateway holds at once; beyond, RESOURCE_EXHAUSTED at once "
        "(each model's queue has its own bound: max_queue_size in config.pbtxt)"
    )
    flush_interval_us: int = knob(
        2000, "the Python gateway: under load (2 or more requests per round trip), send queued requests to "
        "Redis at most once "
        "per this many microseconds "
        "(0: send as soon as possible); bigger groups cost less CPU per request, at up to this much latency"
    )
    flush_interval_edge_us: int = knob(
        500, "the native edge's flush_interval_us (the edge waits only once a round trip carries 8 requests; "
        "its rounds are cheap, and on one core a longer wait idles the model more than it saves)"
    )
    max_tensor_elements: int = knob(
        1 << 26, "most elements one input tensor may have (INVALID_ARGUMENT beyond); max_message_bytes bounds "
        "the bytes, this the element count"
    )
    max_bytes_elements: int = knob(
        1 << 20, "most elements one BYTES input may have (each is length-prefixed and checked one by one)"
    )
    reuse_port: bool = knob(
        False, "share grpc_port with other gateway processes on this host (SO_REUSEPORT; the kernel spreads "
        "connections across them): one gateway process uses about one core, so run one per core to use more. "
        "Off, a second gateway on a taken port fails at start instead of silently sharing it"
    )
    tls_cert_file: str = knob(
        "", "PEM certificate (chain) to serve TLS with, beside tls_key_file; read again when it changes "
        "(docs/security.md). Empty: plaintext"
    )
    tls_key_file: str = knob("", "PEM private key of tls_cert_file")
    tls_client_ca_file: str = knob(
        "", "PEM CA certificate(s): with it, every client must present a certificate they signed (mTLS)"
    )
    auth_tokens_file: str = knob(
        "", "JSON file of accepted tokens (SHA-256 digests) and the models each may use "
        "(docs/security.md; `ferry token` makes one). Empty: no authentication"
    )
    auth_open: str = knob(
        "grpc.health.v1.Health", "with auth_tokens_file: services or methods callable without a token, "
        "comma-separated (e.g. grpc.health.v1.Health,inference.GRPCInferenceService/ServerLive)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port {self.grpc_port} is not a TCP port")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")
        if self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s must be > 0")
        if self.max_inflight < 1:
            raise ConfigError("max_inflight must be >= 1")
        if not 0 <= self.flush_interval_us <= 100_000:
            raise ConfigError("flush_interval_us must be between 0 and 100000")
        if not 0 <= self.flush_interval_edge_us <= 100_000:
            raise ConfigError("flush_interval_edge_us must be between 0 and 100000")
        if self.max_tensor_elements < 1 or self.max_bytes_elements < 1:
            raise ConfigError("max_tensor_elements and max_bytes_elements must be >= 1")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together: set both, or neither for plaintext")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file (mTLS) needs TLS: set tls_cert_file and tls_key_file too")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name} {value!r} is not a readable file")
        if not self.gateway_id:
            object.__setattr__(self, "gateway_id", _instance_id())


@dataclass(frozen=True)
class BrokerSettings(CommonSettings):
    DEFAULT_METRICS_PORT: ClassVar[int] = 8003

    broker_id: str = knob("", "unique id of this broker in Redis (default: host-pid-random)")
    batch_window: str = knob(
        "adaptive", "when a partial batch leaves: 'adaptive' (as soon as the model's pool has room; "
        "batches grow with load while workers are busy) or 'fixed' (Triton's rule: once its oldest "
        "request waited max_queue_delay; for reproducible comparisons)"
    )
    max_queue_delay_us: int = knob(
        -1, "with batch_window=fixed, the window in microseconds for every model, overriding "
        "max_queue_delay_microseconds in config.pbtxt (-1: use each model's config)"
    )
    gather_us: int = knob(
        2000, "with batch_window=adaptive, the batching window under load: while at least 2 more requests "
        "are expected within it (measured arrival rate) a partial batch waits this long, as a fixed "
        "window would; below that rate it leaves just in time for a worker. 0: never wait for a free "
        "worker (better closed-loop throughput at moderate concurrency, worse tail latency under load "
        "behind the Python gateway). `ferry up --edge` sets 0: the edge groups requests itself"
    )
    just_in_time: bool = knob(
        True, "with batch_window=adaptive, below the gather rate a partial batch leaves at once for an idle "
        "worker (lowest latency at light load); false: only when the gateways hold no other call, else it "
        "gathers up to gather_us. `ferry up` turns it off when its processes are confined to one CPU, where "
        "every early batch takes the core from the gateway (docs/scheduling.md)"
    )
    return_wait_us: int = knob(
        4000, "with batch_window=adaptive, after a batch's replies go out, a partial batch waits up to this long "
        "for as many new requests as that batch answered (closed-loop clients send their next call as soon as "
        "they have a reply; while they trickle back, half this long after each one, at most twice this after the "
        "replies), while those and the queue fill at most a quarter of a batch: fewer, bigger model calls. "
        "Applies to the batches of the broker's own worker (colocated_worker: only it says when its replies "
        "left), and only while the CPUs the broker may run on are saturated (see return_wait_always); 0: off "
        "(docs/scheduling.md)"
    )
    return_wait_always: bool = knob(
        False, "apply return_wait_us even while the broker's CPUs have idle time (by default it starts holding once "
        "they idled at most 5 percent of a second and stops once they idle more than 10: with idle CPU the "
        "wait buys nothing, and open-loop callers may not be coming back; docs/scheduling.md)"
    )
    pool_depth: int = knob(
        2, "batches per live worker a pool's stream may hold (one running, the next ready); the rest "
        "wait in the broker, where they still grow into bigger batches and obey priorities. `ferry up --edge` "
        "sets 1 (all of its processes on one host: a batch leaves when the worker is free)"
    )
    starvation_limit: int = knob(
        8, "a priority level with waiting requests is passed over at most this many batches in a row "
        "(plus one per higher level)"
    )
    read_count: int = knob(4096, "most request groups read from Redis in one call")
    colocated_worker: bool = knob(
        False, "also run one worker in this process, configured as `ferry worker` is by its FERRY_* variables "
        "(pool, runtime, ...) and sharing this broker's Redis, repository, logging and metrics: one process "
        "fewer on every batch's path, and that pool's batches handed over in-process rather than through Redis "
        "(docs/architecture.md). `ferry up --edge` does this for its first worker on fewer than 4 CPUs "
        "(docs/edge.md)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_window not in ("adaptive", "fixed"):
            raise ConfigError(f"batch_window {self.batch_window!r} must be 'adaptive' or 'fixed'")
        if self.gather_us < 0:
            raise ConfigError("gather_us must be >= 0")
        if self.return_wait_us < 0:
            raise ConfigError("return_wait_us must be >= 0")
        if self.pool_depth < 1:
            raise ConfigError("pool_depth must be >= 1")
        if self.starvation_limit < 1:
            raise ConfigError("starvation_limit must be >= 1")
        if self.read_count < 1:
            raise ConfigError("read_count must be >= 1")
        if not self.broker_id:
            object.__setattr__(self, "broker_id", _instance_id())


# What each pool name runs by default; a custom pool names its runtime with --runtime.
DEFAULT_RUNTIMES = {"cpu": "onnx-cpu", "gpu": "onnx-gpu", "neuron": "neuron"}
RUNTIMES = ("onnx-cpu", "onnx-gpu", "neuron")
POOL_NAME_RE = r"[a-z0-9][a-z0-9_-]{0,62}"
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")


@dataclass(frozen=True)
class WorkerSettings(CommonSettings):
    DEFAULT_METRICS_PORT: ClassVar[int] = 8004

    pool: str = knob(
        "cpu", "pool this worker serves (cpu, gpu, neuron or a custom name); it runs every model whose "
        "ferry.pools lists this pool"
    )
    runtime: str = knob(
        "", "onnx-cpu, onnx-gpu or neuron (default: onnx-cpu for pool cpu, onnx-gpu for gpu, neuron "
        "for neuron; a custom pool must name one)"
    )
    worker_id: str = knob("", "unique id of this worker in Redis (default: host-pid-random)")
    intra_op_threads: int = knob(1, "onnxruntime intra-op threads per session (0 = one per core)")
    inter_op_threads: int = knob(
        1, "onnxruntime inter-op threads per session; with intra_op_threads, keeps several workers on "
        "one host from oversubscribing its cores"
    )
    coalesce: int = knob(
        4, "most queued batches a worker claims in one read, merging those of one model into one run"
    )
    compute_thread: bool = knob(
        False, "run the model on a thread of its own instead of the event loop: costs a thread hand-off "
        "per batch, but keeps heartbeats on time when one batch takes longer than about a second"
    )
    yield_after_replies: bool = knob(
        True, "after writing a batch's replies, give up the CPU once (sched_yield) before the batch's "
        "bookkeeping and the next batch, so that Redis and the gateway, where they share this worker's core, "
        "pass the replies on first; costs nothing where no other process waits for the core "
        "(docs/architecture.md)"
    )
    max_attempts: int = knob(
        3, "a request that was running every time a worker died this many times is dead-lettered with "
        "INTERNAL instead of retried (a batch is split in halves after 2 deaths, to isolate it); see "
        "docs/reliability.md"
    )
    fault_exit_on_id: str = knob(
        "", "fault injection, for tests only: the worker kills itself (SIGKILL) when handed a request "
        "with this id, as a model that crashes its process would; empty = off"
    )
    # --- onnx-gpu (onnxruntime-gpu) ---
    device_id: int = knob(0, "onnx-gpu: CUDA device this worker uses (one worker per device is typical)")
    gpu_mem_limit_mb: int = knob(0, "onnx-gpu: CUDA memory arena limit in MiB (0 = no limit)")
    arena_extend_strategy: str = knob(
        "kNextPowerOfTwo", "onnx-gpu: how the CUDA arena grows: kNextPowerOfTwo or kSameAsRequested"
    )
    tensorrt: bool = knob(
        False, "onnx-gpu: put onnxruntime's TensorrtExecutionProvider ahead of CUDA (needs TensorRT libraries)"
    )
    trt_fp16: bool = knob(False, "onnx-gpu with tensorrt: allow FP16 kernels")
    trt_engine_cache_path: str = knob(
        "", "onnx-gpu with tensorrt: directory that caches built engines across restarts (empty = no cache)"
    )
    cuda_graph: bool = knob(
        False, "onnx-gpu: capture the model as a CUDA graph and replay it (static shapes only: the model "
        "needs ferry.batch_sizes with a single size)"
    )
    # --- neuron (AWS Inferentia / Trainium, torch-neuronx) ---
    neuron_cores: str = knob(
        "", "neuron: NeuronCores this worker may use, as NEURON_RT_VISIBLE_CORES takes them ('0', '0-1', "
        "'2,3'); empty = leave the Neuron runtime's default"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not re.fullmatch(POOL_NAME_RE, self.pool):
            raise ConfigError(f"pool {self.pool!r} is not a valid pool name (lowercase letters, digits, '-', '_')")
        runtime = self.runtime or DEFAULT_RUNTIMES.get(self.pool, "")
        if not runtime:
            raise ConfigError(
                f"pool {self.pool!r} is a custom pool: say which runtime it runs with --runtime "
                f"({', '.join(RUNTIMES)})"
            )
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        object.__setattr__(self, "runtime", runtime)
        if self.intra_op_threads < 0:
            raise ConfigError("intra_op_threads must be >= 0")
        if self.inter_op_threads < 0:
            raise ConfigError("inter_op_threads must be >= 0")
        if self.coalesce < 1:
            raise ConfigError("coalesce must be >= 1")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be >= 1")
        if self.device_id < 0:
            raise ConfigError("device_id must be >= 0")
        if self.gpu_mem_limit_mb < 0:
            raise ConfigError("gpu_mem_limit_mb must be >= 0 (0 = no limit)")
        if self.arena_extend_strategy not in ARENA_STRATEGIES:
            raise ConfigError(f"arena_extend_strategy must be one of {', '.join(ARENA_STRATEGIES)}")
        if self.neuron_cores and not re.fullmatch(r"\d+(-\d+)?", self.neuron_cores):
            raise ConfigError(f"neuron_cores {self.neuron_cores!r}: use one core or a range, e.g. 2 or 0-1")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", _instance_id())


ALL_SETTINGS = (GatewaySettings, BrokerSettings, WorkerSettings)
S = TypeVar("S", bound=CommonSettings)


# Read by the native edge (gateway/edge/main.go, docs/edge.md), not by any Python process: known here
# so that one environment (a compose file, a pod) can serve every process, and a typo still fails.
EDGE_ENV_NAMES = frozenset({
    "FERRY_EDGE_LISTEN", "FERRY_EDGE_UPSTREAM", "FERRY_EDGE_GATEWAY_ID", "FERRY_EDGE_METRICS_LISTEN",
    "FERRY_EDGE_REUSE_PORT", "FERRY_EDGE_CPU_PROFILE", "FERRY_EDGE_PROCS", "FERRY_EDGE_WINDOW_BYTES",
})


# Read by `ferry up` itself (ferry.cluster), which passes its environment on to every process.
LAUNCHER_ENV_NAMES = frozenset({"FERRY_EDGE_BINARY"})


def known_env_names() -> set[str]:
    return ({ENV_PREFIX + f.name.upper() for cls in ALL_SETTINGS for f in dataclasses.fields(cls)}
            | EDGE_ENV_NAMES | LAUNCHER_ENV_NAMES)


def check_env(env: Mapping[str, str]) -> None:
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known_env_names())
    if unknown:
        raise ConfigError(
            f"unknown setting(s) in the environment: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_env_names()))}"
        )


def _convert(name: str, typ: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    target = {"int": int, "float": float, "bool": bool, "Path": Path, "str": str}.get(
        typ if isinstance(typ, str) else typ.__name__
    )
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return target(raw) if target else raw
    except ValueError:
        raise ConfigError(f"setting {name}: {raw!r} is not a valid {target.__name__ if target else typ}") from None


def build(cls: type[S], flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> S:
    """Flags (None = not given) over FERRY_* environment over defaults."""
    env = os.environ if env is None else env
    check_env(env)
    unknown = set(flags) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown setting(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = flags.get(f.name)
        if raw is None:
            raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None and f.name == "redis_url":
            raw = env.get("REDIS_URL")
        if raw is not None:
            values[f.name] = _convert(f.name, f.type, raw)
    return cls(**values)
