"""The bundled example: an MLP 256 -> 1024 -> 1024 -> 10 (FP32), generated in code.

Weights come from a fixed seed, so every machine builds the same model and
tests can compare outputs bit for bit; nothing is downloaded.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

EXAMPLE_MODEL = "mlp"
INPUT, OUTPUT = "INPUT0", "OUTPUT0"
LAYERS = (256, 1024, 1024, 10)

CONFIG = f"""\
name: "{EXAMPLE_MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ {{ name: "{INPUT}" data_type: TYPE_FP32 dims: [ {LAYERS[0]} ] }} ]
output [ {{ name: "{OUTPUT}" data_type: TYPE_FP32 dims: [ {LAYERS[-1]} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def build_onnx(seed: int = 0, hidden: int = LAYERS[1]) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = INPUT
    layers = (LAYERS[0], hidden, hidden, LAYERS[-1])
    for i, (n_in, n_out) in enumerate(itertools.pairwise(layers)):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(layers) - 2
        mm, out = f"mm{i}", OUTPUT if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [mm]))
        if last:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out]))
        else:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, EXAMPLE_MODEL,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", LAYERS[0]])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", LAYERS[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ferry")
    model.ir_version = 8  # readable by every onnxruntime >= 1.12
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_repository(root: Path, hidden: int = LAYERS[1]) -> Path:
    """Write ``<root>/mlp/{config.pbtxt,1/model.onnx}`` (idempotent); return ``root``.

    ``hidden`` widens the hidden layers (same inputs and outputs), for benchmarks that need the
    model rather than the RPC path to be the bottleneck."""
    model_dir = root / EXAMPLE_MODEL
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / "1" / "model.onnx"
    data = build_onnx(hidden=hidden)
    if not onnx_path.exists() or onnx_path.read_bytes() != data:
        onnx_path.write_bytes(data)
    (model_dir / "config.pbtxt").write_text(CONFIG)
    return root
