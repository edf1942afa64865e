"""Ray Serve runner for the rayserve peer; runs inside the peer's venv (see rayserve.py).

One foreground process: it starts a private local Ray instance (1 logical CPU, no dashboard,
random internal ports, temp dir under --workdir), starts Serve with the gRPC proxy on --port
serving ``inference.GRPCInferenceService`` and one replica of the MLP, prints a ready line,
and blocks. SIGTERM or SIGINT: ``serve.shutdown()``, ``ray.shutdown()``, exit 0. Every Ray
process (GCS, raylet, agents, workers) is a descendant of this one, so a ``taskset`` prefix
pins them all. Some of them get process groups of their own, and after a SIGKILL of this
process the dashboard and runtime-env agents were seen to outlive it: stop it with SIGTERM.
The gRPC proxy binds ``[::]:port`` (Serve has no host option for gRPC); Ray's own services
listen on random ports (several on all interfaces), guarded by a per-run auth token.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

T0 = time.monotonic()

# Read by Ray at import or node start, so set before `import ray`.
# Worker gRPC ports default to the fixed range 10002-19999, which could take the port a parallel
# benchmark run picked; 0 lets the OS choose (parameter.py honours RAY_USE_RANDOM_PORTS).
# GCS, raylet, object manager, metrics and runtime-env agent ports are already random for
# `ray.init()`; the dashboard agent's HTTP port is not (see agent_port_zero).
os.environ["RAY_USE_RANDOM_PORTS"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no network here; avoids the usage-stats thread
# Ray 2.60 turns token auth on for a new local cluster and, without a token, writes one to
# ~/.ray/auth_token (shared by every run, outside the workdir). A per-run token in the
# environment keeps auth on, is inherited by every Ray process, and writes nothing.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402
from ray.serve.schema import LoggingConfig  # noqa: E402

MODEL, VERSION = "mlp", "1"
INPUT, OUTPUT = "INPUT0", "OUTPUT0"
N_IN, N_OUT = 256, 10
SERVICER = "rayserve_oip.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
# Unix socket paths (sun_path) hold 107 bytes; Ray puts its sockets at
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (about 65 bytes after <temp>).
MAX_TEMP_DIR_LEN = 40


def agent_port_zero() -> None:
    """Make ray.init() start the dashboard agent's HTTP server on a free port.

    ray.init() builds RayParams without passing dashboard_agent_listen_port, whose default is
    the fixed 52365 (``ray start`` has --dashboard-agent-listen-port for this; ray.init has no
    argument). A second run on the same host would retry that bind for ~3 s and then run
    without it. 0 is a supported value (the agent reads back the bound port)."""
    from ray._private import parameter

    init = parameter.RayParams.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        init(self, *args, **kwargs)

    parameter.RayParams.__init__ = patched  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_temp_dir(workdir: Path) -> tuple[Path, Path | None]:
    """Return (Ray temp dir, directory to delete at exit or None).

    ``<workdir>/ray`` when the path is short enough for Ray's Unix sockets; otherwise a short
    directory in /tmp, linked from ``<workdir>/ray`` so the logs are still found there."""
    wanted = workdir / "ray"
    if len(str(wanted)) <= MAX_TEMP_DIR_LEN:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted, None
    short = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    if not wanted.exists():
        wanted.symlink_to(short, target_is_directory=True)
    return short, short


def build_app(onnx_path: str, max_batch: int, delay_us: int) -> Any:
    """The OIP deployment; a closure so that ``@serve.batch`` gets this run's knobs directly."""

    @serve.deployment(
        name="mlp",
        num_replicas=1,
        ray_actor_options={"num_cpus": 1},
        # The default (5) would cap a batch at 5 requests and make the proxy queue the rest;
        # Triton queues everything, so let every in-flight request reach the batcher.
        max_ongoing_requests=max(1024, 4 * max_batch),
        # Serve logs one access line per request by default; the other servers don't.
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        graceful_shutdown_wait_loop_s=0.2,
        graceful_shutdown_timeout_s=5,
    )
    class OIPModel:
        def __init__(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            import onnxruntime as ort
            from rayserve_oip import grpc_service_pb2 as pb
            from rayserve_oip import model_config_pb2 as mc

            self.pb, self.mc = pb, mc
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            # One thread runs the model, so the replica's event loop keeps receiving and queueing
            # requests (as Triton's scheduler does) while a batch computes.
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
            # Triton-style counters for ModelStatistics, so perf_analyzer can report the server-side
            # split (queue vs compute) and the average batch size (inference / execution count).
            self.n_inferences = self.n_executions = 0
            self.success_ns = self.queue_ns = self.infer_ns = 0
            self.last_inference_ms = 0
            self.batch_stats: dict[int, list[int]] = {}  # rows -> [executions, ns]

        # --- health and metadata -------------------------------------------------------
        async def ServerLive(self, request: Any) -> Any:
            return self.pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any) -> Any:
            return self.pb.ServerReadyResponse(ready=True)

        async def ModelReady(self, request: Any) -> Any:
            return self.pb.ModelReadyResponse(ready=request.name == MODEL and request.version in ("", VERSION))

        async def ServerMetadata(self, request: Any) -> Any:
            # perf_analyzer reports server-side stats only when "statistics" is listed here.
            return self.pb.ServerMetadataResponse(name="rayserve", version=ray.__version__, extensions=["statistics"])

        async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
            self._check_model(request.name, request.version, grpc_context)
            pb = self.pb
            return pb.ModelMetadataResponse(
                name=MODEL, versions=[VERSION], platform="onnxruntime_onnx",
                inputs=[pb.ModelMetadataResponse.TensorMetadata(name=INPUT, datatype="FP32", shape=[-1, N_IN])],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, N_OUT])],
            )

        async def ModelConfig(self, request: Any, grpc_context: Any) -> Any:
            self._check_model(request.name, request.version, grpc_context)
            mc = self.mc
            config = mc.ModelConfig(
                name=MODEL, platform="onnxruntime_onnx", backend="onnxruntime",
                # perf_analyzer reads this to decide that inputs carry a batch dimension.
                max_batch_size=max_batch,
                input=[mc.ModelInput(name=INPUT, data_type=mc.TYPE_FP32, dims=[N_IN])],
                output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[N_OUT])],
                dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=delay_us),
                instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
            )
            return self.pb.ModelConfigResponse(config=config)

        async def ModelStatistics(self, request: Any, grpc_context: Any) -> Any:
            if request.name:
                self._check_model(request.name, request.version, grpc_context)
            pb, n = self.pb, self.n_inferences

            def dur(count: int, ns: int) -> Any:
                return pb.StatisticDuration(count=count, ns=ns)

            stats = pb.ModelStatistics(
                name=MODEL, version=VERSION, last_inference=self.last_inference_ms,
                inference_count=n, execution_count=self.n_executions,
                inference_stats=pb.InferStatistics(
                    success=dur(n, self.success_ns), queue=dur(n, self.queue_ns),
                    compute_input=dur(n, 0), compute_infer=dur(n, self.infer_ns), compute_output=dur(n, 0),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=size, compute_input=dur(count, 0), compute_infer=dur(count, ns),
                        compute_output=dur(count, 0),
                    )
                    for size, (count, ns) in sorted(self.batch_stats.items())
                ],
            )
            return pb.ModelStatisticsResponse(model_stats=[stats])

        def _check_model(self, name: str, version: str, grpc_context: Any) -> None:
            import grpc

            if name != MODEL or version not in ("", VERSION):
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown model {name!r} version {version!r}")
                raise LookupError(f"unknown model {name!r} version {version!r}")

        # --- inference -----------------------------------------------------------------
        async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:
            import grpc

            self._check_model(request.model_name, request.model_version, grpc_context)
            try:
                x = self._decode(request)
            except ValueError as e:
                grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                grpc_context.set_details(str(e))
                raise
            t0 = time.perf_counter_ns()
            y, queue_ns, infer_ns = await self.infer((x, t0))
            self.n_inferences += 1
            self.queue_ns += queue_ns
            self.infer_ns += infer_ns
            self.success_ns += time.perf_counter_ns() - t0
            self.last_inference_ms = time.time_ns() // 1_000_000
            pb = self.pb
            return pb.ModelInferResponse(
                model_name=MODEL, model_version=VERSION, id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32", shape=list(y.shape))],
                raw_output_contents=[y.tobytes()],
            )

        def _decode(self, request: Any) -> np.ndarray:
            if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
                raise ValueError(f"expected one input named {INPUT}")
            tensor = request.inputs[0]
            shape = tuple(tensor.shape)
            if tensor.datatype != "FP32" or len(shape) != 2 or shape[1] != N_IN:
                raise ValueError(f"{INPUT} must be FP32 [n,{N_IN}], got {tensor.datatype} {list(shape)}")
            if request.raw_input_contents:
                data = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
            else:
                data = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
            if data.size != shape[0] * N_IN:
                raise ValueError(f"{INPUT} holds {data.size} values, shape says {list(shape)}")
            return data.reshape(shape)

        # Serve's batcher: at most max_batch requests per model call, waiting at most delay_us
        # for a batch to fill; one batch at a time (max_concurrent_batches defaults to 1).
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=delay_us / 1e6)
        async def infer(self, items: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, int, int]]:
            """items: (input rows, arrival ns); returns (output rows, queue ns, compute ns) each."""
            import asyncio

            xs = [x for x, _ in items]
            batch = xs[0] if len(xs) == 1 else np.concatenate(xs)
            start = time.perf_counter_ns()
            y = await asyncio.get_running_loop().run_in_executor(self.pool, self._run, batch)
            took = time.perf_counter_ns() - start
            self.n_executions += 1
            entry = self.batch_stats.setdefault(len(batch), [0, 0])
            entry[0] += 1
            entry[1] += took
            bounds = np.cumsum([len(x) for x in xs])[:-1]
            return [(part, start - t, took) for part, (_, t) in zip(np.split(y, bounds), items, strict=True)]

        def _run(self, batch: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(self.session.run([OUTPUT], {INPUT: batch})[0])

    return OIPModel.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="gRPC (OIP) port")
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--max-batch", type=int, required=True)
    parser.add_argument("--delay-us", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    temp_dir, cleanup = ray_temp_dir(args.workdir)
    try:
        # address="local" always starts a new private instance: a plain ray.init() would join
        # whatever cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster points at.
        agent_port_zero()
        ray.init(
            address="local",
            num_cpus=1,
            include_dashboard=False,
            object_store_memory=128 * 1024**2,  # nothing large goes through it; default is 30% of RAM
            log_to_driver=True,
            logging_level="WARNING",
            _temp_dir=str(temp_dir),
            # One machine: advertise the node (GCS, raylet, actor RPC addresses) as loopback.
            _node_ip_address="127.0.0.1",
        )
        t_ray = time.monotonic() - T0
        # ray.init installs its own SIGTERM handler (sys.exit / kill the node without serve.shutdown);
        # take SIGTERM back so that it ends in the orderly shutdown below.
        signal.signal(signal.SIGTERM, on_signal)
        serve.start(
            # The HTTP proxy cannot be turned off without the gRPC one; give it a free port.
            http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
            grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[SERVICER]),
            logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        )
        # The proxy routes gRPC only to applications that have a route prefix (route_prefix=None
        # registers no endpoint, and every RPC gets NOT_FOUND "Application metadata not set").
        serve.run(build_app(args.onnx, args.max_batch, args.delay_us), name="mlp", route_prefix="/")
        print(
            f"rayserve ready: gRPC on port {args.port} (ray.init {t_ray:.1f}s, "
            f"total {time.monotonic() - T0:.1f}s)",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        t_stop = time.monotonic()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
        print(f"rayserve stopped in {time.monotonic() - t_stop:.1f}s", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
