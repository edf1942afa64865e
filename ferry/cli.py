"""The ``ferry`` command: run a component, a whole local cluster, or a test request."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ferry import settings as cfg
from ferry.errors import ConfigError, FerryError


def _add_settings(parser: argparse.ArgumentParser, cls: type[cfg.CommonSettings]) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = cfg.ENV_PREFIX + f.name.upper()
        default = f.default if f.default != "" else "(generated)"
        if f.name == "metrics_port":
            default = cls.DEFAULT_METRICS_PORT
        text = f"{f.metadata['help']} [env {env}; default: {default}]"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=text, metavar=f.name.upper())


# WorkerSettings knobs `ferry profile` passes through to the runtimes it loads.
PROFILE_KNOBS = (
    "intra_op_threads", "inter_op_threads", "device_id", "gpu_mem_limit_mb", "arena_extend_strategy",
    "tensorrt", "trt_fp16", "trt_engine_cache_path", "cuda_graph", "neuron_cores",
)


def _add_worker_knobs(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The WorkerSettings flags ``ferry profile`` passes to the runtimes, with their worker help."""
    fields = {f.name: f for f in dataclasses.fields(cfg.WorkerSettings)}
    for name in names:
        f = fields[name]
        flag = "--" + name.replace("_", "-")
        text = f"{f.metadata['help']} [env {cfg.ENV_PREFIX + name.upper()}; default: {f.default}]"
        if f.type == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=text, metavar=name.upper())


def _settings(cls: type[cfg.S], ns: argparse.Namespace) -> cfg.S:
    names = {f.name for f in dataclasses.fields(cls)}
    return cfg.build(cls, {k: v for k, v in vars(ns).items() if k in names})


def _component(ns: argparse.Namespace) -> None:
    from ferry import lifecycle
    from ferry.repository import load_repository

    classes: dict[str, type[cfg.CommonSettings]] = {
        "gateway": cfg.GatewaySettings, "broker": cfg.BrokerSettings, "worker": cfg.WorkerSettings,
    }
    settings: cfg.CommonSettings = _settings(classes[ns.command], ns)
    lifecycle.setup_logging(settings.log_level, settings.log_json)
    repo = load_repository(settings.model_repository)
    from ferry import metrics

    try:
        metrics.serve(settings.metrics_port, settings.metrics_host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc}); "
                          "pick another port with --metrics-port (0: any free port, -1: off)") from None

    async def main(stop: asyncio.Event) -> None:
        from ferry.redis_conn import REDIS_DOWN, unavailable

        try:
            await serve_component(stop)
        except REDIS_DOWN as exc:
            # Redis refused or dropped us for good (wrong address, password, TLS): say so, not a traceback.
            raise unavailable(settings.redis_url, exc) from None

    async def serve_component(stop: asyncio.Event) -> None:
        if isinstance(settings, cfg.GatewaySettings):
            from gateway.server import serve

            await serve(settings, repo, stop)
            return
        from workers.worker import Worker

        components: list[Any]
        if isinstance(settings, cfg.BrokerSettings):
            from broker.service import Broker

            if settings.colocated_worker:
                from broker.handoff import Handoff

                worker_settings = _colocated_worker_settings(settings)
                # The broker hands its worker's pool's batches over in-process, not through Redis.
                handoff = Handoff(worker_settings.pool, settings.pool_depth)
                components = [Broker(settings, repo, handoff), Worker(worker_settings, repo, handoff)]
            else:
                components = [Broker(settings, repo)]
        else:
            assert isinstance(settings, cfg.WorkerSettings)
            components = [Worker(settings, repo)]
        await _serve_in_order(components, stop)

    lifecycle.run(main)


def _colocated_worker_settings(broker: cfg.BrokerSettings) -> cfg.WorkerSettings:
    """The in-process worker's settings: its own knobs from the environment, as `ferry worker` reads
    them; what both share (Redis, repository, timeouts, logging, grace) from the broker's, flags included."""
    common = {f.name: getattr(broker, f.name) for f in dataclasses.fields(cfg.CommonSettings)}
    return cfg.build(cfg.WorkerSettings, common)


async def _serve_in_order(components: list[Any], stop: asyncio.Event) -> None:
    """Run components (a broker, a worker, or a broker and its colocated worker) on one event loop
    (the model runs on it too, unless compute_thread) until ``stop`` or until one ends on its own
    (an error), whose error is then raised.

    They stop one after another in the given order, the order `ferry up` stops separate processes:
    the broker first, handing over what it holds, then the worker, which runs what was handed over."""
    tasks = [asyncio.create_task(c.run(), name=type(c).__name__) for c in components]
    watcher = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait([*tasks, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        for component, task in zip(components, tasks, strict=True):
            component.stop()
            await asyncio.wait([task])
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


def _channel(ns: argparse.Namespace, address: str) -> Any:
    """A channel to a gateway: TLS when --ca is given (with --cert/--key for mTLS), else plaintext."""
    import grpc

    if not ns.ca:
        if ns.cert or ns.key:
            raise ConfigError("--cert/--key need --ca (the CA that signed the gateway's certificate)")
        return grpc.insecure_channel(address)
    try:
        creds = grpc.ssl_channel_credentials(
            ns.ca.read_bytes(), ns.key.read_bytes() if ns.key else None, ns.cert.read_bytes() if ns.cert else None)
    except OSError as exc:
        raise ConfigError(f"cannot read a TLS file: {exc}") from None
    options = [("grpc.ssl_target_name_override", ns.server_name)] if ns.server_name else []
    return grpc.secure_channel(address, creds, options=options)


def _metadata(ns: argparse.Namespace) -> list[tuple[str, str]]:
    if not ns.token_file:
        return []
    try:
        token = ns.token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file: {exc}") from None
    return [("authorization", f"Bearer {token}")]


def _add_client_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--ca", type=Path, default=None, help="PEM CA of the gateway's TLS certificate (TLS when given)")
    sp.add_argument("--cert", type=Path, default=None, help="client certificate, for a gateway that requires mTLS")
    sp.add_argument("--key", type=Path, default=None, help="private key of --cert")
    sp.add_argument("--server-name", default=None, help="name to check the gateway's certificate against")
    sp.add_argument("--token-file", type=Path, default=None,
                    help="file holding a token to send as 'authorization: Bearer' (a file, not a flag: command "
                    "lines are visible to other users)")


def _infer(ns: argparse.Namespace) -> None:
    import numpy as np

    from ferry import datatypes
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pbg

    md = _metadata(ns)
    with _channel(ns, ns.url) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=ns.model, version=ns.version), timeout=10,
                                  metadata=md)
        rng = np.random.default_rng(ns.seed)
        req = pb.ModelInferRequest(model_name=ns.model, model_version=ns.version, id="ferry-infer")
        for t in meta.inputs:
            shape = [ns.batch if d == -1 and i == 0 else (1 if d == -1 else d) for i, d in enumerate(t.shape)]
            dtype = datatypes.lookup(t.datatype, what=t.name)
            if dtype.is_bytes:
                arr = np.array([b"ferry"] * datatypes.element_count(shape), dtype=object).reshape(shape)
            else:
                arr = rng.standard_normal(shape).astype(dtype.numpy)
            req.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
            req.raw_input_contents.append(datatypes.encode_raw(dtype, arr))
        resp = stub.ModelInfer(req, timeout=ns.timeout, metadata=md)
    print(f"model {resp.model_name} version {resp.model_version} id {resp.id}")
    for out, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
        arr = datatypes.decode_raw(datatypes.lookup(out.datatype, what=out.name), list(out.shape), raw)
        print(f"{out.name} {out.datatype} {list(out.shape)}:\n{arr}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, cls, text in (
        ("gateway", cfg.GatewaySettings, "serve the Open Inference Protocol over gRPC"),
        ("broker", cfg.BrokerSettings, "form batches from queued requests and hand them to pools"),
        ("worker", cfg.WorkerSettings, "run batches for one pool"),
    ):
        _add_settings(sub.add_parser(name, help=text, description=text), cls)
    up = sub.add_parser("up", help="run a whole cluster locally (Redis, broker, worker, gateway)")
    up.add_argument("--model-repository", type=Path, default=None,
                    help="model repository to serve (default: the bundled example MLP)")
    up.add_argument("--grpc-port", type=int, default=8001, help="gateway port (default 8001)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address (default 127.0.0.1)")
    up.add_argument("--workers", type=int, default=1, help="CPU workers to start (default 1)")
    up.add_argument("--gateways", type=int, default=None,
                    help="gateway processes sharing the gRPC port (SO_REUSEPORT): one uses about a core "
                    "(default: one per 4 CPUs this process may use, counting a container's CPU quota; 1 to 8)")
    up.add_argument("--edge", action="store_true",
                    help="put the native edge (Go; scripts/build-edge) in front of each gateway: it queues plain "
                    "inference calls itself at a fraction of the gateway's CPU and relays the rest (docs/edge.md)")
    up.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=None,
                    help="run the first worker inside the broker's process (one process fewer per batch; "
                    "default: with --edge on fewer than 4 usable CPUs)")
    up.add_argument("--sched-batch", action=argparse.BooleanOptionalAction, default=None,
                    help="run every process it starts under Linux's SCHED_BATCH policy, so that they do not preempt "
                    "one another on wake-up (default: on fewer than 4 usable CPUs, where they share cores; "
                    "docs/edge.md)")
    up.add_argument("--redis-url", default=None,
                    help="use this Redis instead of starting one [env REDIS_URL / FERRY_REDIS_URL]")
    inf = sub.add_parser("infer", help="send one request with random inputs and print the result")
    inf.add_argument("--url", default="127.0.0.1:8001", help="gateway address (default 127.0.0.1:8001)")
    inf.add_argument("--model", default="mlp", help="model name (default mlp)")
    inf.add_argument("--version", default="", help="model version (default: latest)")
    inf.add_argument("--batch", type=int, default=1, help="rows to send (default 1)")
    inf.add_argument("--seed", type=int, default=0, help="random seed for the inputs")
    inf.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    _add_client_flags(inf)
    ex = sub.add_parser("example-model", help="write the bundled example model repository to a folder")
    ex.add_argument("path", type=Path)
    ex.add_argument("--hidden", type=int, default=1024,
                    help="width of the two hidden layers (default 1024; 4096 makes the model, not the "
                    "gateway, the bottleneck of a small machine, for overload benchmarks)")
    pr = sub.add_parser(
        "profile", help="measure a model on each of its pools and plan the cheapest pool mix",
        description="Measure one worker of each pool in the model's ferry.pools (a batch-size sweep, the "
        "runtime called in-process: no RPC or queueing) and print throughput, batch latency and cost per "
        "million inferences; with --target-rps, the cheapest workers per pool that carry it (docs/profile.md).",
    )
    pr.add_argument("--model-repository", dest="model_repository", type=Path, default=None,
                    help="model repository [env FERRY_MODEL_REPOSITORY; default: models]")
    pr.add_argument("--model", default=None, help="model name (default: the repository's only model)")
    pr.add_argument("--version", default="", help="model version (default: latest)")
    pr.add_argument("--batch-sizes", default=None, metavar="N,N,...",
                    help="batch sizes to measure (default: the model's ferry.batch_sizes, else powers of two "
                    "up to max_batch_size; 1 for an unbatched model)")
    pr.add_argument("--seconds", type=float, default=2.0, help="measuring time per pool and batch size (default 2)")
    pr.add_argument("--pools", default=None, metavar="POOL,POOL",
                    help="profile only these of the model's ferry.pools (default: all of them)")
    pr.add_argument("--pool-runtime", action="append", default=[], metavar="POOL=RUNTIME",
                    help="runtime for a pool (repeatable; default: cpu onnx-cpu, gpu onnx-gpu, neuron neuron, "
                    "a custom pool onnx-cpu)")
    pr.add_argument("--dim", action="append", default=[], metavar="INPUT=SIZE",
                    help="size of an input's variable (-1) dims (repeatable; default 1)")
    pr.add_argument("--target-rps", type=float, default=None,
                    help="plan the cheapest workers that carry this many inferences/s")
    pr.add_argument("--p99-ms", type=float, default=None,
                    help="with --target-rps: bound on one batch's p99 latency in ms (default: none)")
    pr.add_argument("--plot", type=Path, default=None,
                    help="write throughput and p99 against batch size here (.svg, .png; needs matplotlib)")
    pr.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    _add_worker_knobs(pr, PROFILE_KNOBS)
    he = sub.add_parser(
        "health", help="probe a Ferry process (container HEALTHCHECK, Kubernetes exec probes)",
        description="Exit 0 when the process answers: a gateway over grpc.health.v1 (--grpc, SERVING "
        "required), a broker or worker over its metrics endpoint (--http). Exit 1 otherwise, with the reason.",
    )
    he.add_argument("--grpc", metavar="HOST:PORT", default=None, help="a gateway's gRPC address, e.g. 127.0.0.1:8001")
    he.add_argument("--http", metavar="HOST:PORT", default=None,
                    help="a process's metrics address, e.g. 127.0.0.1:8003")
    he.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    _add_client_flags(he)
    sub.add_parser(
        "token", help="make an API token: prints it once, and its entry for auth_tokens_file",
        description="Prints a new random token and the JSON entry (its SHA-256, never the token) to add to the "
        "gateway's auth_tokens_file; edit name and models. The token cannot be recovered from the file.",
    )
    sub.add_parser(
        "redis-acl", help="print the least-privilege Redis ACL users for gateway, broker and worker",
        description="Prints one ACL SETUSER line per component (ferry-gateway, ferry-broker, ferry-worker) with "
        "the commands, keys and channels it needs and nothing else (broker/acl.py); replace <password>, run them "
        "with redis-cli or put them in an ACL file, and give each component its user in its Redis URL.",
    )
    return p


def _health(ns: argparse.Namespace) -> int:
    """0 when the probed process answers healthy; 1 (with the reason on stderr) otherwise."""
    if bool(ns.grpc) == bool(ns.http):
        raise ConfigError("say what to probe: --grpc HOST:PORT (a gateway) or --http HOST:PORT (its metrics)")
    try:
        if ns.grpc:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with _channel(ns, ns.grpc) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=ns.timeout,
                                                                   metadata=_metadata(ns))
            if status.status != health_pb2.HealthCheckResponse.SERVING:
                print(f"ferry health: {ns.grpc} is {health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)}",
                      file=sys.stderr)
                return 1
        else:
            import urllib.request

            with urllib.request.urlopen(f"http://{ns.http}/metrics", timeout=ns.timeout) as resp:
                if resp.status != 200:
                    print(f"ferry health: {ns.http} answered HTTP {resp.status}", file=sys.stderr)
                    return 1
    except Exception as exc:  # any failure to answer is "unhealthy", said plainly
        print(f"ferry health: {ns.grpc or ns.http} did not answer: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        if ns.command in ("gateway", "broker", "worker"):
            _component(ns)
        elif ns.command == "up":
            import os

            from ferry.cluster import up

            cfg.check_env(os.environ)
            redis_url = ns.redis_url or os.environ.get("FERRY_REDIS_URL") or os.environ.get("REDIS_URL")
            return up(ns.model_repository, ns.grpc_port, ns.workers, ns.host, redis_url, ns.gateways, ns.edge,
                      ns.colocate, ns.sched_batch)
        elif ns.command == "infer":
            _infer(ns)
        elif ns.command == "example-model":
            from ferry.example_model import write_repository

            print(write_repository(ns.path, hidden=ns.hidden))
        elif ns.command == "profile":
            from workers.profile import main as profile

            return profile(ns)
        elif ns.command == "health":
            return _health(ns)
        elif ns.command == "redis-acl":
            from broker.acl import setuser_lines

            print("\n".join(setuser_lines()))
        elif ns.command == "token":
            from gateway.security import new_token

            token, digest = new_token()
            print(f"token (give it to the client; it is not stored anywhere): {token}")
            print("entry for auth_tokens_file:", json.dumps({"name": "CHANGE-ME", "sha256": digest, "models": ["*"]}))
    except ConfigError as exc:
        print(f"ferry {ns.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except FerryError as exc:
        print(f"ferry {ns.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
