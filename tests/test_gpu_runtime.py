"""The onnx-gpu runtime (workers/onnx_gpu.py), with real onnxruntime and real ONNX models.

Verified on a machine without a GPU (the CPU onnxruntime package):
  * building the runtime there fails at load with ConfigError and the install hint;
  * every provider option the settings produce (TensorRT on/off, FP16, engine cache,
    profiles, memory limit, CUDA graph) and the load-time refusals (CUDA graph without
    one fixed shape, BYTES tensors, a session that came up without a provider it was given);
  * the IOBinding code, run against onnxruntime's CPU device: ``run_bound`` and the
    pre-allocated, updated-in-place ``StaticBinding`` give what ``session.run`` gives.
Not verified without a GPU (the tests marked ``cuda`` skip): host/device copies, the CUDA
and TensorRT providers accepting these options, CUDA graph capture and replay.

Ferry code runs in a subprocess: ferry.model_config imports Ferry's protos, which cannot
share the pytest process with tritonclient (see conftest).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
# onnxruntime-gpu lists TensorRT among its providers whether or not TensorRT's own libraries are
# there (they are loaded when a session asks for the provider), so look for them too.
TRT_BUILT_IN = "TensorrtExecutionProvider" in ort.get_available_providers()


def _tensorrt_libraries() -> bool:
    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return False
    return True


HAS_TENSORRT = TRT_BUILT_IN and _tensorrt_libraries()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")

PRELUDE = """
import json, logging, sys
from pathlib import Path
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from ferry.errors import ConfigError, FerryError
from ferry.example_model import write_repository
from ferry.repository import load_repository
from ferry.settings import WorkerSettings
from workers import onnx_gpu
from workers.onnx_gpu import OnnxGpuRuntime, StaticBinding, check_active, provider_options, run_bound

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
root = Path(sys.argv[1])

def save(name, nodes, ins, outs, config, inits=()):
    graph = helper.make_graph(nodes, name, ins, outs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (root / name / "config.pbtxt").write_text(f'name: "{name}"\\n' + config)

def sizes(text):
    return 'parameters { key: "ferry.batch_sizes" value: { string_value: "%s" } }\\n' % text

def fp32(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))

# y = x @ w (FP32 [batch, 3]) and n = int64(x) ([batch, 4]): two outputs of two types.
w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, "w")
two = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Cast", ["x"], ["n"], to=TensorProto.INT64)]
two_out = [fp32("y", "b", 3), helper.make_tensor_value_info("n", TensorProto.INT64, ["b", 4])]
write_repository(root)
save("static", two, [fp32("x", "b", 4)], two_out, "max_batch_size: 8\\n" + sizes("8"), [w])
save("multi", two, [fp32("x", "b", 4)], two_out, "max_batch_size: 8\\n" + sizes("1,4,8"), [w])
save("seq", [helper.make_node("Identity", ["x"], ["y"])], [fp32("x", "b", "n")], [fp32("y", "b", "n")],
     "max_batch_size: 8\\n" + sizes("8"))
save("colon", [helper.make_node("Identity", ["x:0"], ["y"])], [fp32("x:0", "b", 2)], [fp32("y", "b", 2)],
     "max_batch_size: 4\\n")
save("text", [helper.make_node("Identity", ["s"], ["t"])],
     [helper.make_tensor_value_info("s", TensorProto.STRING, ["b", 1])],
     [helper.make_tensor_value_info("t", TensorProto.STRING, ["b", 1])], "max_batch_size: 4\\n")
repo = load_repository(root)

def model(name):
    return repo.get(name)

def settings(**kw):
    return WorkerSettings(pool="gpu", **kw)

def error(fn, *args):
    try:
        fn(*args)
    except FerryError as exc:
        return type(exc).__name__ + ": " + exc.message
    return None

def cpu_session(name):
    return ort.InferenceSession(str(model(name).model_file), providers=["CPUExecutionProvider"])

def batch(rows, width=256, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
"""


def ferry(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> Any:
    """Run PRELUDE + body in a fresh interpreter; body prints one JSON value as its last line."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, **(env or {})}, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": json.loads(proc.stdout.strip().splitlines()[-1]), "log": proc.stderr}


@pytest.mark.skipif(HAS_CUDA, reason="checks the message of a machine without CUDA")
def test_without_cuda_the_runtime_refuses_to_load_with_the_install_hint(tmp_path: Path) -> None:
    msg = ferry(tmp_path, "print(json.dumps(error(OnnxGpuRuntime, model('mlp'), settings())))")["out"]
    assert msg.startswith("ConfigError: ") and "onnxruntime-gpu" in msg, msg
    assert "pip install 'ferry-serve[gpu]'" in msg and "WITHOUT the onnxruntime" in msg, msg
    assert "CPUExecutionProvider" in msg  # says what it found instead


def test_default_providers_are_cuda_alone(tmp_path: Path) -> None:
    out = ferry(tmp_path, "print(json.dumps(provider_options(settings(), model('mlp').settings)))")["out"]
    # No CPUExecutionProvider: onnxruntime adds it itself for the nodes CUDA lacks.
    assert out == [["CUDAExecutionProvider", {"device_id": "0", "arena_extend_strategy": "kNextPowerOfTwo",
                                              "do_copy_in_default_stream": "1"}]]


def test_tensorrt_fp16_cache_profile_and_memory_limit(tmp_path: Path) -> None:
    cache = tmp_path / "engines"
    out = ferry(tmp_path, f"""
s = settings(tensorrt=True, trt_fp16=True, trt_engine_cache_path={str(cache)!r}, device_id=1,
             gpu_mem_limit_mb=512, arena_extend_strategy="kSameAsRequested")
plain = settings(tensorrt=True)
print(json.dumps([provider_options(s, model("static").settings), provider_options(plain, model("mlp").settings)]))
""")["out"]
    (trt, cuda_), (plain_trt, _) = out
    assert trt == ["TensorrtExecutionProvider", {
        "device_id": "1", "trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache),
        "trt_profile_min_shapes": "x:1x4", "trt_profile_opt_shapes": "x:8x4", "trt_profile_max_shapes": "x:8x4"}]
    assert cuda_ == ["CUDAExecutionProvider", {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                                               "do_copy_in_default_stream": "1", "gpu_mem_limit": str(512 << 20)}]
    # Profiles span batch 1 to max_batch_size (32) even without ferry.batch_sizes; no cache unless asked.
    assert plain_trt == ["TensorrtExecutionProvider", {
        "device_id": "0", "trt_fp16_enable": "0", "trt_profile_min_shapes": "INPUT0:1x256",
        "trt_profile_opt_shapes": "INPUT0:32x256", "trt_profile_max_shapes": "INPUT0:32x256"}]


def test_tensorrt_profile_is_left_out_when_it_cannot_be_written(tmp_path: Path) -> None:
    result = ferry(tmp_path, """
s = settings(tensorrt=True)
print(json.dumps([sorted(provider_options(s, model(n).settings)[0][1]) for n in ("seq", "colon")]))
""")
    assert result["out"] == [["device_id", "trt_fp16_enable"]] * 2
    assert "model seq: no explicit TensorRT profile, inputs ['x'] have variable non-batch dims" in result["log"]
    assert "model colon: no explicit TensorRT profile, input names ['x:0'] contain ':'" in result["log"]


def test_tensorrt_knobs_without_tensorrt_are_refused(tmp_path: Path) -> None:
    out = ferry(tmp_path, """
m = model("mlp").settings
print(json.dumps([error(provider_options, settings(trt_fp16=True), m),
                  error(provider_options, settings(trt_engine_cache_path="/tmp/x"), m)]))
""")["out"]
    assert out == ["ConfigError: trt_fp16 and trt_engine_cache_path configure the TensorRT provider: "
                   "add --tensorrt, or drop them"] * 2


def test_cuda_graph_options_and_the_models_it_refuses(tmp_path: Path) -> None:
    out = ferry(tmp_path, """
g = settings(cuda_graph=True)
gt = settings(cuda_graph=True, tensorrt=True)
print(json.dumps({
    "cuda": provider_options(g, model("static").settings),
    "trt": provider_options(gt, model("static").settings),
    "errors": [error(provider_options, g, model(n).settings) for n in ("multi", "mlp", "seq")],
}))
""")["out"]
    assert out["cuda"][0][1]["enable_cuda_graph"] == "1"
    (trt, cuda_) = out["trt"]
    assert trt[1]["trt_cuda_graph_enable"] == "1" and "enable_cuda_graph" not in cuda_[1]
    multi, mlp, seq = out["errors"]
    assert multi.startswith("ConfigError: model 'multi': cuda_graph replays one captured shape") and \
        "(it lists 1,4,8)" in multi and '"ferry.batch_sizes" value: { string_value: "8" }' in multi, multi
    assert "(it lists none)" in mlp and 'string_value: "32"' in mlp, mlp
    assert "cuda_graph needs fixed shapes, but tensors ['x', 'y'] have variable dims" in seq, seq


def test_bytes_tensors_are_refused_before_anything_else(tmp_path: Path) -> None:
    msg = ferry(tmp_path, "print(json.dumps(error(OnnxGpuRuntime, model('text'), settings())))")["out"]
    assert msg.startswith("ConfigError: ") and "tensors ['s', 't'] are BYTES" in msg and "cpu pool" in msg, msg


def test_a_session_without_the_providers_it_was_given_is_refused(tmp_path: Path) -> None:
    out = ferry(tmp_path, """
p = Path("m.onnx")
print(json.dumps([error(check_active, ["CPUExecutionProvider"], ["CUDAExecutionProvider"], p),
                  error(check_active, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                        ["TensorrtExecutionProvider", "CUDAExecutionProvider"], p),
                  error(check_active, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                        ["TensorrtExecutionProvider", "CUDAExecutionProvider"], p)]))
""")["out"]
    assert out[0].startswith("ConfigError: m.onnx: onnxruntime built the session without CUDAExecutionProvider "
                             "(active: CPUExecutionProvider), so it would run on the CPU"), out[0]
    assert "without TensorrtExecutionProvider (active: CUDAExecutionProvider, CPUExecutionProvider)" in out[1]
    assert out[2] is None


def test_iobinding_run_on_the_cpu_device_equals_session_run(tmp_path: Path) -> None:
    """Exercises the real IOBinding API (bind_cpu_input, bind_output to a device, run_with_iobinding,
    copy_outputs_to_cpu) with the CPU device standing in for the GPU; what the CUDA device adds,
    the host/device copies, is not verified here."""
    out = ferry(tmp_path, """
mlp = cpu_session("mlp")
same = []
for rows in (1, 8, 64):
    x = batch(rows, seed=rows)
    bound = run_bound(mlp, {"INPUT0": x}, ["OUTPUT0"], "cpu", 0)
    same.append(bool(np.array_equal(bound["OUTPUT0"], mlp.run(["OUTPUT0"], {"INPUT0": x})[0])))
two = cpu_session("static")
x = batch(3, width=4)[:, ::-1]  # not contiguous
bound = run_bound(two, {"x": x}, ["n", "y"], "cpu", 0)  # outputs in a different order than the graph's
want = dict(zip(["n", "y"], two.run(["n", "y"], {"x": np.ascontiguousarray(x)})))
print(json.dumps({"mlp": same, "two": [bool(np.array_equal(bound[k], want[k])) for k in ("n", "y")],
                  "dtypes": [str(bound["n"].dtype), str(bound["y"].dtype)]}))
""")["out"]
    assert out == {"mlp": [True, True, True], "two": [True, True], "dtypes": ["int64", "float32"]}


def test_static_binding_on_the_cpu_device_updates_in_place_and_keeps_results(tmp_path: Path) -> None:
    """The CUDA graph path's buffers (allocated once, bound once, updated in place, run with the graph's
    RunOptions) on the CPU device; graph capture and replay themselves are not verified here."""
    out = ferry(tmp_path, """
s = cpu_session("static")
sb = StaticBinding(s, model("static").settings, "cpu", 0)
sb.warm_up()
xs = [batch(8, width=4, seed=k) for k in range(3)]
results = [sb.run({"x": x}, ["y", "n"]) for x in xs]  # earlier results must survive later batches
same = [bool(np.array_equal(r[k], v)) for r, x in zip(results, xs)
        for k, v in zip(["y", "n"], s.run(["y", "n"], {"x": x}))]
converted = sb.run({"x": xs[0].astype(np.float64)}, ["y"])["y"]  # same element count, other type
print(json.dumps({"same": same, "converted": bool(np.array_equal(converted, results[0]["y"])),
                  "short": error(sb.run, {"x": xs[0][:4]}, ["y"])}))
""")["out"]
    assert out["same"] == [True] * 6 and out["converted"]
    assert out["short"] == "Internal: input 'x' has shape [4, 4], but the model's CUDA graph was captured for [8, 4]"


@cuda
def test_mlp_on_cuda_matches_cpu(tmp_path: Path) -> None:
    out = ferry(tmp_path, """
rt = OnnxGpuRuntime(model("mlp"), settings())
cpu = cpu_session("mlp")
worst = []
for rows in (1, 8, 64):
    x = batch(rows, seed=rows)
    got, want = rt.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], cpu.run(["OUTPUT0"], {"INPUT0": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    worst.append(float(np.abs(got - want).max()))
print(json.dumps({"devices": rt.devices, "providers": rt.session.get_providers(), "worst": worst}))
""", env={"NVIDIA_TF32_OVERRIDE": "0"})["out"]  # onnxruntime's CUDA MatMul uses TF32 by default: ~1e-3 off
    assert out["devices"] == ["cuda:0"] and out["providers"][0] == "CUDAExecutionProvider", out


@cuda
def test_cuda_graph_replays_match_cpu(tmp_path: Path) -> None:
    out = ferry(tmp_path, """
rt = OnnxGpuRuntime(model("static"), settings(cuda_graph=True))
cpu = cpu_session("static")
for k in range(4):  # the capture ran at load; these are replays, each on new inputs
    x = batch(8, width=4, seed=k)
    got, want = rt.run({"x": x}, ["y", "n"]), dict(zip(["y", "n"], cpu.run(["y", "n"], {"x": x})))
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-3, atol=1e-5)
    assert np.array_equal(got["n"], want["n"])
again = rt.run({"x": x}, ["y"])["y"]
print(json.dumps(bool(np.array_equal(again, got["y"]))))
""", env={"NVIDIA_TF32_OVERRIDE": "0"})["out"]
    assert out is True


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs onnxruntime-gpu with TensorRT libraries")
def test_tensorrt_matches_cpu(tmp_path: Path) -> None:
    out = ferry(tmp_path, f"""
rt = OnnxGpuRuntime(model("static"), settings(tensorrt=True, trt_engine_cache_path={str(tmp_path / "trt")!r}))
cpu = cpu_session("static")
x = batch(8, width=4)
np.testing.assert_allclose(rt.run({{"x": x}}, ["y"])["y"], cpu.run(["y"], {{"x": x}})[0], rtol=1e-3, atol=1e-5)
print(json.dumps(rt.session.get_providers()))
""")["out"]
    assert out[0] == "TensorrtExecutionProvider"


@pytest.mark.skipif(not HAS_CUDA or not TRT_BUILT_IN or HAS_TENSORRT,
                    reason="needs onnxruntime-gpu with CUDA, and TensorRT's libraries absent")
def test_tensorrt_without_its_libraries_is_refused_at_load(tmp_path: Path) -> None:
    """A GPU machine without TensorRT: --tensorrt must fail at load, never serve on CUDA (or the CPU) quietly."""
    msg = ferry(tmp_path, "print(json.dumps(error(OnnxGpuRuntime, model('static'), settings(tensorrt=True))))")["out"]
    assert msg is not None and msg.startswith("ConfigError: ") and "static" in msg, msg
    assert "TensorrtExecutionProvider" in msg or "cannot load it on cuda:0" in msg, msg
