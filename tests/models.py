"""Small ONNX models built in code for the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ferry.example_model import write_repository

# OIP datatype -> (ONNX element type, numpy dtype); BF16 has no numpy type and is tested separately.
IDENTITY_TYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


def _save(model_dir: Path, version: int, graph: onnx.GraphProto, config: str) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / str(version) / "model.onnx").write_bytes(model.SerializeToString())
    (model_dir / "config.pbtxt").write_text(config)


def identity_model(root: Path) -> None:
    """One input and one output per datatype: OUT_x = Identity(IN_x), shape [batch, 4]."""
    nodes, ins, outs = [], [], []
    for name, (onnx_type, _) in IDENTITY_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"IN_{name}"], [f"OUT_{name}"]))
        ins.append(helper.make_tensor_value_info(f"IN_{name}", onnx_type, ["batch", 4]))
        outs.append(helper.make_tensor_value_info(f"OUT_{name}", onnx_type, ["batch", 4]))
    graph = helper.make_graph(nodes, "identity", ins, outs)
    _save(root / "identity", 1, graph, 'name: "identity"\nmax_batch_size: 8\n')


def versioned_model(root: Path) -> None:
    """Versions 1 and 2 of y = x + version, FP32 [batch, 2]; both served."""
    for version in (1, 2):
        const = numpy_helper.from_array(np.full((2,), version, dtype=np.float32), "c")
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "c"], ["y"])], "versioned",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
            initializer=[const],
        )
        _save(root / "versioned", version, graph,
              'name: "versioned"\nmax_batch_size: 4\nversion_policy: { all: {} }\n')


def fragile_model(root: Path) -> None:
    """Reshape [batch, n] -> [batch, 3, n/3]: fails at run time unless n is a multiple of 3."""
    shape = numpy_helper.from_array(np.array([0, 3, -1], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "k"])],
        initializer=[shape],
    )
    _save(root / "fragile", 1, graph, 'name: "fragile"\nmax_batch_size: 8\n')


def unbatched_model(root: Path) -> None:
    """max_batch_size 0: y = -x with x FP32 [3]."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])], "unbatched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    _save(root / "unbatched", 1, graph, 'name: "unbatched"\nmax_batch_size: 0\n')


def slow_model(root: Path) -> None:
    """max_batch_size 0: y = max(M^7) where M is x broadcast to 768x768; ~1 GFLOP per MatMul, so
    one call takes tens to hundreds of milliseconds, long enough to outlive a short deadline."""
    shape = numpy_helper.from_array(np.array([768, 768], dtype=np.int64), "shape")
    nodes = [helper.make_node("Expand", ["x", "shape"], ["m0"])]
    for i in range(6):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "m0"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("ReduceMax", ["m6"], ["r"], keepdims=0))
    nodes.append(helper.make_node("Reshape", ["r", "one"], ["y"]))
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[shape, one],
    )
    _save(root / "slow", 1, graph, 'name: "slow"\nmax_batch_size: 0\n')


def _paced_graph(size: int, matmuls: int) -> onnx.GraphProto:
    """y = max((x broadcast to size x size)^(matmuls+1)) per row, FP32 [batch, 1]: a batched model whose
    cost per row is fixed, so that tests can see the order in which batches ran."""
    shape = numpy_helper.from_array(np.array([1, size, size], dtype=np.int64), "shape")
    nodes = [helper.make_node("Unsqueeze", ["x", "one"], ["x3"]),
             helper.make_node("Expand", ["x3", "shape"], ["m0"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "m0"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("ReduceMax", [f"m{matmuls}"], ["r"], axes=[1, 2], keepdims=0))
    nodes.append(helper.make_node("Unsqueeze", ["r", "last"], ["y"]))
    one = numpy_helper.from_array(np.array([2], dtype=np.int64), "one")
    last = numpy_helper.from_array(np.array([1], dtype=np.int64), "last")
    return helper.make_graph(
        nodes, "paced",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[shape, one, last],
    )


def scheduling_models(root: Path) -> None:
    """Models whose config.pbtxt exercises the scheduler (see tests/test_scheduling.py)."""
    graph = _paced_graph(512, 4)
    _save(root / "paced", 1, graph, """name: "paced"
max_batch_size: 1
dynamic_batching {
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { allow_timeout_override: true max_queue_size: 4 }
}
""")
    _save(root / "delayed", 1, graph, """name: "delayed"
max_batch_size: 1
dynamic_batching {
  default_queue_policy { timeout_action: DELAY allow_timeout_override: true }
}
""")
    ident = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "ident",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    _save(root / "static", 1, ident, """name: "static"
max_batch_size: 8
parameters { key: "ferry.batch_sizes" value: { string_value: "1,4,8" } }
""")
    seq = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    _save(root / "seq", 1, seq, """name: "seq"
max_batch_size: 8
parameters { key: "ferry.shape_buckets" value: { string_value: "x=4,8" } }
""")


def full_repository(root: Path) -> Path:
    write_repository(root)
    identity_model(root)
    versioned_model(root)
    fragile_model(root)
    unbatched_model(root)
    slow_model(root)
    scheduling_models(root)
    return root
