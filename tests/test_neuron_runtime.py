"""The Neuron pool's adapter (workers/neuron.py) and compile script, against STAND-INs.

No Inferentia hardware or Neuron SDK exists on the build machine, and neither
torch nor torch-neuronx can be installed there.  tests/standins/ holds
clearly labelled stand-ins for both; these tests check only Ferry's side of
the contract (environment before import, which file is loaded, argument and
output order, load-time refusals, padding through the worker's BatchRunner),
not anything Neuron does.  One test uses no stand-in: the real "nothing
installed" case.

Each test runs in a child process, for two reasons: Ferry's protos cannot share
the pytest process with tritonclient (see conftest), and the stand-ins must not
be importable in the pytest process.  The child puts tests/standins on its own
sys.path, fakes /dev/neuron* with files in a temporary directory, and fakes
neuron-ls with a script, then prints one JSON line of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = r'''
import contextlib, io, json, os, sys
from pathlib import Path
ROOT, TMP, STANDINS = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
sys.path.insert(0, str(ROOT))
if STANDINS:
    sys.path.insert(0, str(ROOT / "tests" / "standins"))
import numpy as np
import onnx
from onnx import TensorProto, helper
import workers.neuron as neuron
from ferry.errors import ConfigError
from ferry.repository import load_repository
from ferry.settings import WorkerSettings

# No /dev/neuron* here: fake device nodes, and a neuron-ls that prints --json-output's list of devices.
DEV = TMP / "dev"
DEV.mkdir(exist_ok=True)
for i in range(2):
    (DEV / f"neuron{i}").touch()
neuron.DEV_GLOB = str(DEV / "neuron*")
LS = TMP / "neuron-ls"
LS.write_text("#!/bin/sh\necho '[{\"neuron_device\": 0, \"nc_count\": 2}, {\"neuron_device\": 1, \"nc_count\": 2}]'\n")
LS.chmod(0o755)
neuron.NEURON_LS = str(LS)
REPO = TMP / "repo"
out = {}

def interface(program):
    """The version's model.onnx: only its tensor names, types and shapes matter to Ferry."""
    if program == "bytes":
        nodes = [helper.make_node("Identity", ["s"], ["t"])]
        ins = [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch", 1])]
        outs = [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch", 1])]
    elif program == "double":
        nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    else:
        nodes = [helper.make_node("Sub", ["x", "y"], ["diff"]), helper.make_node("Mul", ["x", "y"], ["prod"])]
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in ("x", "y")]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in ("diff", "prod")]
    model = helper.make_model(helper.make_graph(nodes, program, ins, outs), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()

def write_model(name, program, *, max_batch=4, params=None, traced=4, extra="", artifact=True, meta=None):
    """<repo>/<name>/config.pbtxt, 1/model.onnx and (stand-in) 1/model.neuron.pt traced at batch `traced`."""
    version = REPO / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.onnx").write_bytes(interface(program))
    params = {"ferry.pools": "neuron", **(params or {})}
    lines = [f'name: "{name}"', f"max_batch_size: {max_batch}", extra]
    lines += [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()]
    (REPO / name / "config.pbtxt").write_text("\n".join(lines) + "\n")
    if artifact:
        import torch  # the stand-in; torch_neuronx stays unimported until the runtime imports it
        n_in = 1 if program == "double" else 2
        torch.jit.save(torch.jit.ScriptModule(program, [[traced, 3]] * n_in), version / "model.neuron.pt")
    if meta is not None:
        (version / "model.neuron.json").write_text(json.dumps(meta))
    return version

def version_of(name):
    return load_repository(REPO).get(name)

def refusal(name, settings=None):
    try:
        neuron.NeuronRuntime(version_of(name), settings or WorkerSettings(pool="neuron"))
    except ConfigError as exc:
        return exc.message
    return None

X = np.arange(12, dtype=np.float32).reshape(4, 3)
Y = np.full((4, 3), 2.0, dtype=np.float32)
'''


def child(tmp_path: Path, body: str, *, standins: bool = True) -> dict[str, Any]:
    script = tmp_path / "child.py"
    script.write_text(PRELUDE + body + "\nprint(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "NEURON_RT_VISIBLE_CORES"}
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(tmp_path), "1" if standins else "0"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_cores_set_before_import_artifact_loaded_and_outputs_mapped(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
version = write_model("m", "diff_prod", params={"ferry.batch_sizes": "4"})
rt = neuron.NeuronRuntime(version_of("m"), WorkerSettings(pool="neuron", neuron_cores="1"))
import torch, torch_neuronx
out["cores_at_import"] = torch_neuronx.VISIBLE_CORES_AT_IMPORT
out["loaded"] = torch.jit.LOADED
out["expected"] = str(version / "model.neuron.pt")
out["devices"] = rt.devices
both = rt.run({"y": Y, "x": X}, ["diff", "prod"])
out["diff_ok"] = bool(np.array_equal(both["diff"], X - Y))
out["prod_ok"] = bool(np.array_equal(both["prod"], X * Y))
out["only_prod"] = sorted(rt.run({"x": X, "y": Y}, ["prod"]))
out["calls"] = rt.module.calls
ro = np.frombuffer(X.tobytes(), dtype=np.float32).reshape(4, 3)  # read-only, as batches joined from raw bytes are
out["readonly_ok"] = bool(np.array_equal(rt.run({"x": ro, "y": Y}, ["diff"])["diff"], X - Y))
''')
    assert r["cores_at_import"] == "1"  # NEURON_RT_VISIBLE_CORES was set before torch_neuronx was imported
    assert r["loaded"] == [r["expected"]]  # torch.jit.load of <version dir>/model.neuron.pt, once
    assert r["devices"] == ["neuroncore:1"]
    assert r["diff_ok"] and r["prod_ok"] and r["readonly_ok"]
    assert r["only_prod"] == ["prod"]
    # First call: the warm-up on zeros at the compiled size; every call runs under no_grad.
    assert r["calls"][0]["shapes"] == [[4, 3], [4, 3]]
    assert not any(c["grad_enabled"] for c in r["calls"])


def test_inputs_go_positionally_in_config_order(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
extra = 'input [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]'
write_model("m", "diff_prod", params={"ferry.batch_sizes": "4"}, extra=extra)
rt = neuron.NeuronRuntime(version_of("m"), WorkerSettings(pool="neuron"))
out["diff_is_y_minus_x"] = bool(np.array_equal(rt.run({"x": X, "y": Y}, ["diff"])["diff"], Y - X))
''')
    assert r["diff_is_y_minus_x"]  # the config lists y first, so the module's first argument is y


def test_dict_and_single_tensor_results_are_mapped(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
write_model("d", "diff_prod_dict", params={"ferry.batch_sizes": "4"})
write_model("s", "double", params={"ferry.batch_sizes": "4"})
rt = neuron.NeuronRuntime(version_of("d"), WorkerSettings(pool="neuron"))
got = rt.run({"x": X, "y": Y}, ["diff", "prod"])
out["dict_ok"] = bool(np.array_equal(got["diff"], X - Y) and np.array_equal(got["prod"], X * Y))
rt = neuron.NeuronRuntime(version_of("s"), WorkerSettings(pool="neuron"))
out["single_ok"] = bool(np.array_equal(rt.run({"x": X}, ["y"])["y"], X * 2))
out["devices"] = rt.devices
write_model("w", "double", params={"ferry.batch_sizes": "4"})
import torch
torch.jit.save(torch.jit.ScriptModule("diff_prod", [[4, 3]]), REPO / "w" / "1" / "model.neuron.pt")
out["wrong_module"] = refusal("w")
''')
    assert r["dict_ok"] and r["single_ok"]
    assert "warm-up run" in r["wrong_module"]  # a module that does not fit the config fails at load
    assert r["devices"] == [f"neuroncore:{i}" for i in range(4)]  # no neuron_cores: all that neuron-ls reports


def test_static_batch_size_is_required_unless_dynamic(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
write_model("none", "diff_prod")
write_model("meta", "diff_prod", meta={"batch_size": 4, "dynamic_batch": False})
write_model("two", "diff_prod", params={"ferry.batch_sizes": "2,4"})
write_model("wrong", "diff_prod", params={"ferry.batch_sizes": "4"}, meta={"batch_size": 2})
write_model("dyn", "diff_prod", max_batch=8, traced=2, params={"ferry.neuron_dynamic_batch": "true"})
write_model("dyn_off", "diff_prod", max_batch=8, traced=2, meta={"batch_size": 2, "dynamic_batch": True})
for name in ("none", "meta", "two", "wrong", "dyn_off"):
    out[name] = refusal(name)
out["imported_after_refusals"] = "torch_neuronx" in sys.modules
rt = neuron.NeuronRuntime(version_of("dyn"), WorkerSettings(pool="neuron"))
x5, y5 = np.ones((5, 3), np.float32), np.full((5, 3), 3.0, np.float32)
out["dyn_ok"] = bool(np.array_equal(rt.run({"x": x5, "y": y5}, ["prod"])["prod"], x5 * y5))
import torch_neuronx
out["dynamic_batch_calls"] = len(torch_neuronx.DYNAMIC_BATCH_CALLS)
''')
    hint = 'parameters { key: "ferry.batch_sizes" value { string_value: "<compiled size>" } }'
    assert hint in r["none"] and "dynamic batching" in r["none"]
    assert 'string_value: "4"' in r["meta"]  # the compile script's record names the size
    assert "compiled for one batch size" in r["two"]
    assert "compiled for batch size 2" in r["wrong"]
    assert "ferry.neuron_dynamic_batch" in r["dyn_off"]
    assert not r["imported_after_refusals"]  # refused from the config alone, before touching the SDK
    assert r["dyn_ok"] and r["dynamic_batch_calls"] == 1


def test_bytes_tensors_are_refused_at_load(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
write_model("b", "bytes", params={"ferry.batch_sizes": "4"}, artifact=False)
out["msg"] = refusal("b")
''')
    assert "BYTES" in r["msg"] and "cannot serve" in r["msg"]


def test_missing_torch_neuronx_says_how_to_install(tmp_path: Path) -> None:
    # The real environment: neither torch nor torch-neuronx is installed on this machine.
    r = child(tmp_path, r'''
import torch  # the stand-in only writes the artifact here ...
write_model("m", "diff_prod", params={"ferry.batch_sizes": "4"})
for mod in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[mod]  # ... and is gone before the runtime imports
sys.path.remove(str(ROOT / "tests" / "standins"))
out["msg"] = refusal("m", WorkerSettings(pool="neuron", neuron_cores="0-1"))
out["env"] = os.environ.get("NEURON_RT_VISIBLE_CORES")
''')
    assert "torch-neuronx" in r["msg"] and "https://pip.repos.neuron.amazonaws.com" in r["msg"]
    assert "inf2/trn1" in r["msg"]
    assert r["env"] == "0-1"


def test_no_neuron_device_is_refused(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
write_model("m", "diff_prod", params={"ferry.batch_sizes": "4"})
neuron.DEV_GLOB = str(TMP / "nothing" / "neuron*")
out["msg"] = refusal("m")
''')
    assert "no Neuron device" in r["msg"] and "Neuron driver" in r["msg"]


def test_neuron_devices_reads_neuron_ls_defensively(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
out["list"] = neuron.neuron_devices()
new = TMP / "neuron-ls-2.34"  # --json-output gone; --output-format json with top-level fields
new.write_text('#!/bin/sh\n[ "$1" = "--json-output" ] && exit 2\n'
               'echo \'{"instance_type": "inf2.xlarge", "neuron_devices": [{"nc_count": 2}]}\'\n')
new.chmod(0o755)
out["dict"] = neuron.neuron_devices(neuron_ls=str(new))
bad = TMP / "neuron-ls-bad"
bad.write_text("#!/bin/sh\necho not json\n")
bad.chmod(0o755)
out["bad"] = neuron.neuron_devices(neuron_ls=str(bad))
out["absent"] = neuron.neuron_devices(neuron_ls=str(TMP / "no-such-neuron-ls"))
out["none"] = neuron.neuron_devices(dev_glob=str(TMP / "nothing" / "neuron*"))
''')
    assert r["list"] == ["neuroncore:0", "neuroncore:1", "neuroncore:2", "neuroncore:3"]
    assert r["dict"] == ["neuroncore:0", "neuroncore:1"]
    assert r["bad"] == r["absent"] == ["neurondevice:0", "neurondevice:1"]
    assert r["none"] == []


def test_compile_script_writes_artifact_and_prints_config_lines(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
import importlib.util
spec = importlib.util.spec_from_file_location("compile_neuron", ROOT / "scripts" / "compile_neuron.py")
compile_neuron = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compile_neuron)
(TMP / "factory_mod.py").write_text("import torch\ndef build():\n    return torch.nn.Program('diff_prod')\n")
sys.path.insert(0, str(TMP))
version = REPO / "c" / "1"
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    rc = compile_neuron.main(["--module", "factory_mod:build", "--input", "x:FP32:3", "--input", "y:FP32:3",
                              "--batch-size", "4", "--compiler-args", "--auto-cast matmult", "--out", str(version)])
import torch_neuronx
out["rc"], out["printed"], out["trace"] = rc, printed.getvalue(), torch_neuronx.TRACE_CALLS
out["files"] = sorted(p.name for p in version.iterdir())
out["meta"] = json.loads((version / "model.neuron.json").read_text())
# Serve it with the lines the script printed.
(version / "model.onnx").write_bytes(interface("diff_prod"))
config = [l.strip() for l in printed.getvalue().splitlines() if l.startswith("  ")]
(REPO / "c" / "config.pbtxt").write_text('name: "c"\n' + "\n".join(config) + "\n")
rt = neuron.NeuronRuntime(version_of("c"), WorkerSettings(pool="neuron"))
out["served"] = bool(np.array_equal(rt.run({"x": X, "y": Y}, ["diff"])["diff"], X - Y))
dyn = io.StringIO()
with contextlib.redirect_stdout(dyn):
    compile_neuron.main(["--module", "factory_mod:build", "--input", "x:FP32:3", "--input", "y:FP32:3",
                         "--batch-size", "2", "--dynamic-batch", "--out", str(TMP / "d" / "1")])
out["dynamic_printed"] = dyn.getvalue()
out["dynamic_calls"] = len(torch_neuronx.DYNAMIC_BATCH_CALLS)
''')
    assert r["rc"] == 0
    assert r["files"] == ["model.neuron.json", "model.neuron.pt"]
    assert r["trace"][0]["shapes"] == [[4, 3], [4, 3]] and r["trace"][0]["dtypes"] == ["float32", "float32"]
    assert r["trace"][0]["compiler_args"] == ["--auto-cast", "matmult"]
    assert r["trace"][0]["training"] is False  # eval() before tracing
    assert r["meta"]["batch_size"] == 4 and r["meta"]["dynamic_batch"] is False
    assert "max_batch_size: 4" in r["printed"]
    assert 'parameters { key: "ferry.batch_sizes" value { string_value: "4" } }' in r["printed"]
    assert 'parameters { key: "ferry.pools" value { string_value: "neuron" } }' in r["printed"]
    assert "model.onnx" in r["printed"]  # the interface file was missing, and the script said so
    assert r["served"]
    assert 'parameters { key: "ferry.neuron_dynamic_batch" value { string_value: "true" } }' in r["dynamic_printed"]
    assert r["dynamic_calls"] == 1


def test_batch_runner_pads_three_rows_to_compiled_four(tmp_path: Path) -> None:
    r = child(tmp_path, r'''
from broker.messages import Member, iter_replies
from protos import grpc_service_pb2 as pb
from workers.batch import BatchRunner
write_model("m", "diff_prod", params={"ferry.batch_sizes": "4"})
mv = version_of("m")
rt = neuron.NeuronRuntime(mv, WorkerSettings(pool="neuron"))
runner = BatchRunner(mv, rt)
members = []
for i in range(3):
    req = pb.ModelInferRequest(model_name="m", id=f"r{i}")
    for name, value in (("x", float(i + 1)), ("y", 10.0)):
        req.inputs.add(name=name, datatype="FP32", shape=[1, 3])
        req.raw_input_contents.append(np.full((1, 3), value, np.float32).tobytes())
    members.append(Member("gw", i, 1, 0, 0, req.SerializeToString()))
result = runner.run(members)
out["rows_run"] = result.rows_run
out["shapes"] = rt.module.calls[-1]["shapes"]
diffs = {}
for _, reply in result.replies:
    for corr, code, body in iter_replies(reply):
        resp = pb.ModelInferResponse.FromString(body)
        i = [o.name for o in resp.outputs].index("diff")
        values = np.frombuffer(resp.raw_output_contents[i], np.float32).tolist()
        diffs[resp.id] = [code, list(resp.outputs[i].shape), values]
out["diffs"] = diffs
''')
    assert r["shapes"] == [[4, 3], [4, 3]]  # 3 rows padded to the compiled 4 ...
    assert r["rows_run"] == 4
    for i in range(3):  # ... and each request got its own row back, the padding cut
        assert r["diffs"][f"r{i}"] == [0, [1, 3], [i + 1 - 10.0] * 3]
