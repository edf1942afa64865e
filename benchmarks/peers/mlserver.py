"""Benchmark peer: Seldon MLServer serving the example MLP over the Open Inference Protocol (gRPC).

    .venv/bin/python benchmarks/peers/mlserver.py --venv .cache/peers/mlserver --port 18001   # smoke test

What runs (see benchmarks/peers/mlserver_launch.py and mlserver_runtime.py, copied into the work directory):

* MLServer in ONE process: parallel_workers=0, so no inference-pool worker processes; the model lives in the
  server process, in a custom runtime (an mlserver.MLModel) that runs onnxruntime (CPU provider, 1 intra-op and
  1 inter-op thread) on the event loop, one batch at a time: one model instance.
* MLServer's adaptive batching: max_batch_size = max_batch, max_batch_time = delay_us / 1e6 seconds (at least
  1 us: see MIN_BATCH_TIME_S).
* `mlserver start` plus a ModelConfig RPC (a Triton extension MLServer lacks; perf_analyzer needs it to learn
  max_batch_size), registered on MLServer's gRPC server next to MLServer's own servicer.
* debug off (MLServer's default is on, which logs every gRPC call); REST and metrics servers on free ports.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NAME = "mlserver"

# mlserver 1.7.1: the newest release. uvloop 0.21: with uvloop >= 0.22, MLServer 1.7's inference-pool workers die
# at start ("There is no current event loop", mlserver/parallel/worker.py; MLServer PR #2297, after 1.7.1, fixes
# it, and mlflow pins uvloop<0.22 for it): the pool is off here, but 0.21 is what a working MLServer 1.7 runs on.
# onnxruntime, numpy, grpcio and protobuf: the versions in Ferry's own venv, so that the model maths and the gRPC
# stack are not what differs.
REQUIREMENTS = [
    "mlserver==1.7.1",
    "uvloop==0.21.0",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
    "grpcio==1.85.1",
    "protobuf==6.33.6",
]
VERSION_NOTE = (
    "MLServer 1.7.1 (uvloop 0.21.0, grpcio 1.85.1, onnxruntime 1.32.0): custom onnxruntime runtime, "
    "adaptive batching, parallel_workers=0"
)

MODEL = "mlp"
INPUT, OUTPUT = "INPUT0", "OUTPUT0"
IN_DIM, OUT_DIM = 256, 10
# MLServer turns adaptive batching off altogether when max_batch_time is 0, and then runs every request as its own
# model call. Triton's and Ferry's "no delay" still batch whatever is already queued; MLServer's batcher does that
# with the smallest positive wait (it takes what is queued without waiting, and waits at most this long for more).
MIN_BATCH_TIME_S = 1e-6

_HERE = Path(__file__).resolve().parent
_HELPERS = ("mlserver_launch.py", "mlserver_runtime.py")
_STAMP = "ferry-peer-requirements.txt"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path) -> None:
    """Create `venv` and install REQUIREMENTS into it; a no-op when its stamp already lists exactly them."""
    stamp = venv / _STAMP
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if _python(venv).exists() and stamp.exists() and stamp.read_text() == wanted:
        return
    if not _python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *REQUIREMENTS], check=True)
    stamp.write_text(wanted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(venv: Path, workdir: Path, port: int, onnx_path: Path, max_batch: int, delay_us: int) -> list[str]:
    """Write MLServer's settings, model repository and helper scripts under `workdir`; return the server's argv."""
    settings = {
        "debug": False,
        "parallel_workers": 0,
        "host": "127.0.0.1",
        "grpc_port": port,
        # MLServer always starts its REST server, and its metrics server unless metrics_endpoint is null. The
        # metrics stay on (as by default, and as Ferry's are): free ports keep concurrent runs apart.
        "http_port": _free_port(),
        "metrics_port": _free_port(),
        "metrics_dir": str(workdir / ".metrics"),
        "environments_dir": str(workdir / ".envs"),
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_runtime.OnnxRuntimeModel",
        "platform": "onnxruntime_onnx",
        "versions": ["1"],
        "max_batch_size": max_batch,
        "max_batch_time": max(delay_us * 1e-6, MIN_BATCH_TIME_S),
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, IN_DIM]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, OUT_DIM]}],
        "parameters": {"uri": str(Path(onnx_path).resolve()), "version": "1"},
    }
    (workdir / MODEL).mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2))
    (workdir / MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    # Copies, not the files in benchmarks/peers/: run from there, `import mlserver` in the launcher would find
    # this module (the script's directory comes first on sys.path) instead of the mlserver package.
    for helper in _HELPERS:
        shutil.copyfile(_HERE / helper, workdir / helper)
    # MLServer's model repository is the work directory: it finds mlp/model-settings.json, and puts the directory
    # on sys.path, which is how it imports the runtime named in "implementation".
    return [str(_python(venv)), str(workdir / "mlserver_launch.py"), str(workdir)]


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Smoke test: set up the MLServer peer and serve the example MLP.")
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--delay-us", type=int, default=0)
    ns = parser.parse_args()

    sys.path.insert(0, str(_HERE.parent.parent))
    from ferry.example_model import build_onnx

    started = time.monotonic()
    setup(ns.venv.resolve())
    print(f"setup: {time.monotonic() - started:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="peer-mlserver-") as tmp:
        onnx_path = Path(tmp) / "mlp.onnx"
        onnx_path.write_bytes(build_onnx())
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        argv = serve_command(ns.venv.resolve(), workdir, ns.port, onnx_path, ns.max_batch, ns.delay_us)
        print(" ".join(argv), flush=True)
        proc = subprocess.Popen(argv)
        # Pass SIGTERM on; Ctrl-C reaches the server through the terminal's process group by itself.
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait()
    sys.exit(rc)


if __name__ == "__main__":
    main()
