"""Benchmark peer: NVIDIA Triton Inference Server (python backend) serving the example MLP.

The server is the real ``tritonserver`` binary and python backend that PyPI's ``nvidia-pytriton`` wheel
bundles (the wheel is manylinux_2_35 and carries its own copies of every non-glibc library it links,
so it runs on Debian 12 as is). We run that binary directly, the way pytriton's own launcher does,
without pytriton's Python API:

* the backend directory gets ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub
  built for the venv's Python minor version (pytriton ships one per version and copies the right one in);
* ``LD_LIBRARY_PATH`` gets the wheel's ``nvidia_pytriton.libs`` (the copied backend's ``$ORIGIN`` rpath
  no longer reaches it) and, first, the directory of the venv's own ``libpython3.X.so`` (the stub links
  it; without this the loader would take Debian's libpython3.11, a different patch release than a
  pyenv interpreter's stdlib);
* ``PATH`` starts with the venv's ``bin``: the embedded interpreter in the stub has no program path, so
  CPython looks ``python3`` up on PATH, finds the venv's ``pyvenv.cfg`` and so its site-packages
  (numpy, onnxruntime). This is exactly what pytriton does (pytriton/server/triton_server.py _get_env).

The model (``triton_model.py`` beside this file) concatenates the batch's requests, runs onnxruntime
once and splits the output, so Triton's dynamic batcher really batches model calls.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

NAME = "triton"

PYTRITON_VERSION = "0.7.0"
# The tritonserver bundled in nvidia-pytriton 0.7.0 (the newest release; manylinux_2_35, so it installs on
# Debian 12's glibc 2.36) reports server_version 2.51.0 at startup.
TRITON_VERSION = "2.51.0"
VERSION_NOTE = f"Triton {TRITON_VERSION} (nvidia-pytriton {PYTRITON_VERSION}), python backend + onnxruntime 1.32.0"

# pytriton is installed without its dependencies: we use only the binaries it bundles, not its Python
# API, so tritonclient/grpcio/typer etc. would be dead weight. numpy stays below 2 because that is what
# pytriton 0.7.0 declares for the environment its python backend stub runs in.
REQUIREMENTS: tuple[str, ...] = ("numpy==1.26.4", "onnxruntime==1.32.0")
NO_DEPS_REQUIREMENTS: tuple[str, ...] = (f"nvidia-pytriton=={PYTRITON_VERSION}",)
STAMP = "ferry-peer-requirements.txt"

HERE = Path(__file__).resolve().parent
MODEL_PY = HERE / "triton_model.py"
REPO_ROOT = HERE.parent.parent


def _stamp_text() -> str:
    return "\n".join([*REQUIREMENTS, *(f"{r} --no-deps" for r in NO_DEPS_REQUIREMENTS)]) + "\n"


def setup(venv: Path) -> None:
    """Create ``venv`` with the pinned packages; a no-op when its stamp file already matches."""
    stamp = venv / STAMP
    if stamp.exists() and stamp.read_text() == _stamp_text():
        return
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", *NO_DEPS_REQUIREMENTS], check=True)
    stamp.write_text(_stamp_text())


def _venv_info(venv: Path) -> dict[str, str]:
    """Ask the venv's interpreter where its pieces are (it may be another Python than the caller's)."""
    code = (
        "import json, sys, sysconfig;"
        "print(json.dumps({'version': f'{sys.version_info[0]}.{sys.version_info[1]}',"
        " 'purelib': sysconfig.get_path('purelib'),"
        " 'libdir': sysconfig.get_config_var('LIBDIR') or '',"
        " 'shared': str(sysconfig.get_config_var('Py_ENABLE_SHARED') or 0)}))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    info: dict[str, str] = json.loads(out.stdout)
    return info


def _config_pbtxt(onnx_path: Path, max_batch: int, delay_us: int) -> str:
    return f"""\
name: "mlp"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 256 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "onnx_path" value {{ string_value: {json.dumps(str(onnx_path))} }} }}
"""


def serve_command(venv: Path, workdir: Path, port: int, onnx_path: Path, max_batch: int, delay_us: int) -> list[str]:
    """Write the backend directory and model repository under ``workdir``; return tritonserver's argv."""
    info = _venv_info(venv)
    if info["shared"] != "1":
        # The stub embeds CPython through libpython3.X.so; a static-only interpreter has none to give it.
        raise RuntimeError(f"{venv}: its Python was built without --enable-shared; the Triton stub needs libpython")
    site = Path(info["purelib"])
    dist = site / "pytriton" / "tritonserver"
    libs = site / "nvidia_pytriton.libs"
    stub = dist / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(
            f"nvidia-pytriton {PYTRITON_VERSION} has no python backend stub for Python {info['version']}"
        )

    workdir = workdir.resolve()
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    # Copies, not symlinks, like pytriton: the backend locates the stub next to libtriton_python.so.
    for src in (
        dist / "backends" / "python" / "libtriton_python.so",
        dist / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, backend / src.name)

    model_dir = workdir / "models" / "mlp"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(MODEL_PY, model_dir / "1" / "model.py")
    (model_dir / "config.pbtxt").write_text(_config_pbtxt(onnx_path.resolve(), max_batch, delay_us))

    ld_path = [info["libdir"], str(libs)]
    if os.environ.get("LD_LIBRARY_PATH"):
        ld_path.append(os.environ["LD_LIBRARY_PATH"])
    path = f"{venv.resolve() / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    # The python backend names its /dev/shm regions from this prefix; a unique one keeps two servers
    # running at once (or a crashed run's leftovers) from colliding, as pytriton does per process.
    shm_prefix = f"ferry_triton_{secrets.token_hex(6)}_"
    # `env` execs tritonserver in place, so the pid compare.py holds (and signals) is the server itself.
    return [
        "env",
        f"LD_LIBRARY_PATH={':'.join(ld_path)}",
        f"PATH={path}",
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={workdir / 'models'}",
        f"--backend-directory={workdir / 'backends'}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={port}",
        # Only the gRPC endpoint is measured; HTTP and metrics would need ports of their own.
        "--allow-http=false",
        "--allow-metrics=false",
        "--allow-gpu-metrics=false",
        # CPU-only model: the pinned pool is CUDA page-locked host memory, useless without a GPU.
        "--pinned-memory-pool-byte-size=0",
        # Default is 30 s of waiting for in-flight requests after SIGTERM; a benchmark run is over by then.
        "--exit-timeout-secs=5",
    ]


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="Smoke test: set up the Triton peer and serve the example MLP.")
    ap.add_argument("--venv", type=Path, default=REPO_ROOT / ".cache" / "peers" / NAME)
    ap.add_argument("--port", type=int, default=18001)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay-us", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from ferry.example_model import build_onnx

    setup(args.venv)
    workdir = Path(tempfile.mkdtemp(prefix="ferry-peer-triton-"))
    onnx_path = workdir / "model.onnx"
    onnx_path.write_bytes(build_onnx())
    try:
        argv = serve_command(args.venv, workdir / "serve", args.port, onnx_path, args.max_batch, args.delay_us)
        print(" ".join(argv), flush=True)
        server = subprocess.Popen(argv)
        # Pass SIGTERM/SIGINT on to the server and wait for it, so the scratch directory can go afterwards.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: server.send_signal(signum))
        code = server.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
