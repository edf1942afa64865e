"""GPU runtime: onnxruntime-gpu with the CUDA execution provider, optionally behind TensorRT.

Design:

* Providers come from ``WorkerSettings`` through a pure function,
  ``provider_options``, so every knob can be checked without a GPU.  The list
  holds no ``CPUExecutionProvider``: onnxruntime adds it by itself for the
  nodes no GPU kernel covers (shape arithmetic, mostly), and naming it would
  only let a session with no GPU at all look healthy.
* Fail loudly.  onnxruntime ends up on the CPU without an error in three
  ways: the CPU-only ``onnxruntime`` package is installed (an unavailable
  provider is dropped from the list with a warning); the CUDA provider's
  libraries (CUDA, cuDNN, TensorRT) fail to load (the session is built
  without it, or the Python wrapper retries on the CPU); a provider fails at
  run time (the wrapper switches the session to the CPU for good).  The first
  is refused before loading, the wrapper's fallback is turned off, and the
  providers the session really got are checked against the ones asked for.
* One batch, one copy each way: inputs are bound from host memory and copied
  to the device when the run starts, outputs are bound to the device and
  copied back once (``run_bound``).  The binding code takes the device as a
  parameter, so the same code runs against the CPU device in the tests.
* CUDA graphs (``--cuda-graph``) replay kernels captured on the first run, and
  a replay reads and writes the device addresses of that first run.  So the
  model must have one fixed batch shape (``ferry.batch_sizes`` with a single
  size, no variable dims), and ``StaticBinding`` allocates its device buffers
  once, binds them once, and copies each batch into them in place.  Capture
  and a first replay happen at load, on zeros, so their cost and failures show there.
* BYTES tensors cannot live in GPU memory and BF16 has no numpy type: models
  with either are refused at load, naming the tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ferry.errors import ConfigError, Internal
from ferry.model_config import ModelSettings
from ferry.repository import ModelVersion
from ferry.settings import WorkerSettings
from workers.runtime import Arrays

log = logging.getLogger("ferry.worker")

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# The run option that names a captured graph; 0 is onnxruntime's own and -1 turns capture off.
GRAPH_ID_KEY, GRAPH_ID = "gpu_graph_id", "1"
INSTALL_HINT = (
    "install the gpu extra in an environment WITHOUT the onnxruntime (CPU) package: pip uninstall -y "
    "onnxruntime onnxruntime-gpu && pip install 'ferry-serve[gpu]' (both packages install the same Python "
    "module, one over the other), or 'ferry-serve[gpu-cuda13]' on a CUDA 13 machine: onnxruntime-gpu must be "
    "built for the machine's CUDA major version (docs/gpu.md)"
)

Providers = list[tuple[str, dict[str, str]]]
Shapes = dict[str, tuple[int, ...]]


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def _flag(on: bool) -> str:
    return "1" if on else "0"


def provider_options(settings: WorkerSettings, model: ModelSettings) -> Providers:
    """Execution providers for one model, most preferred first, with their options as strings."""
    if not settings.tensorrt and (settings.trt_fp16 or settings.trt_engine_cache_path):
        # Ignoring them would leave an operator believing FP16 or the cache is in use.
        raise ConfigError("trt_fp16 and trt_engine_cache_path configure the TensorRT provider: "
                          "add --tensorrt, or drop them")
    if settings.cuda_graph:
        graph_shapes(model)
    device = str(settings.device_id)
    providers: Providers = []
    if settings.tensorrt:
        trt = {"device_id": device, "trt_fp16_enable": _flag(settings.trt_fp16)}
        if settings.trt_engine_cache_path:
            trt |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": settings.trt_engine_cache_path}
        trt |= trt_profile(model)
        if settings.cuda_graph:
            # With TensorRT in front, the kernels to capture are TensorRT's, not the CUDA provider's.
            trt["trt_cuda_graph_enable"] = "1"
        providers.append((TENSORRT, trt))
    cuda = {
        "device_id": device,
        "arena_extend_strategy": settings.arena_extend_strategy,
        # Copies on the compute stream: a separate copy stream can race with the kernels.
        "do_copy_in_default_stream": "1",
    }
    if settings.gpu_mem_limit_mb > 0:
        cuda["gpu_mem_limit"] = str(settings.gpu_mem_limit_mb * 1024 * 1024)
    if settings.cuda_graph and not settings.tensorrt:
        cuda["enable_cuda_graph"] = "1"
    providers.append((CUDA, cuda))
    return providers


def trt_profile(model: ModelSettings) -> dict[str, str]:
    """An explicit TensorRT optimisation profile over the batch dimension, 1 to max_batch_size.

    Without one, TensorRT rebuilds its engine each time a batch's shape falls
    outside the range it has seen so far: seconds to minutes, mid-traffic."""
    if model.max_batch_size <= 0:
        return {}  # no batch dimension: TensorRT builds for the shapes the graph declares
    variable = [t.name for t in model.inputs if -1 in t.dims]
    # The provider splits "name:AxB,name:AxB" at the first ':' and at each ','.
    unparsable = [t.name for t in model.inputs if ":" in t.name or "," in t.name]
    if variable or unparsable:
        why = (f"inputs {variable} have variable non-batch dims" if variable
               else f"input names {unparsable} contain ':' or ',', which the profile syntax cannot carry")
        log.info("model %s: no explicit TensorRT profile, %s; TensorRT rebuilds its engine whenever a batch "
                 "shape falls outside the ones it has seen", model.name, why)
        return {}

    def shapes(batch: int) -> str:
        return ",".join(f"{t.name}:{'x'.join(str(d) for d in (batch, *t.dims))}" for t in model.inputs)

    top = shapes(model.max_batch_size)
    return {"trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": top, "trt_profile_max_shapes": top}


def graph_shapes(model: ModelSettings) -> tuple[Shapes, Shapes]:
    """Full input and output shapes of the one batch a CUDA graph replays; ConfigError if there is none."""
    if len(model.static_batch_sizes) != 1:
        have = ",".join(str(s) for s in model.static_batch_sizes) or "none"
        fix = (f'set parameters {{ key: "ferry.batch_sizes" value: {{ string_value: "{model.max_batch_size}" }} }}'
               if model.max_batch_size > 0 else "give it max_batch_size > 0 and one ferry.batch_sizes size")
        raise ConfigError(
            f"model {model.name!r}: cuda_graph replays one captured shape, so every batch must be padded to "
            f"the same size: ferry.batch_sizes must list exactly one size (it lists {have}); {fix}, or serve "
            "the model from a worker without --cuda-graph")
    variable = [t.name for t in (*model.inputs, *model.outputs) if -1 in t.dims]
    if variable:
        raise ConfigError(
            f"model {model.name!r}: cuda_graph needs fixed shapes, but tensors {variable} have variable dims; "
            "fix them in config.pbtxt dims (which may be more specific than the ONNX graph), or serve the "
            "model from a worker without --cuda-graph")
    size = model.static_batch_sizes[0]
    return ({t.name: (size, *t.dims) for t in model.inputs}, {t.name: (size, *t.dims) for t in model.outputs})


def check_active(active: Sequence[str], wanted: Sequence[str], model_file: Path) -> None:
    """Refuse a session that lacks a provider it was given: it would run those nodes on the CPU."""
    missing = [p for p in wanted if p not in active]
    if missing:
        raise ConfigError(
            f"{model_file}: onnxruntime built the session without {', '.join(missing)} (active: "
            f"{', '.join(active) or 'none'}), so it would run on the CPU. Its log above names the library "
            "that failed to load: the CUDA runtime and cuDNN (and TensorRT for --tensorrt) of the major "
            "versions this onnxruntime-gpu was built for must be on the library path")


def run_bound(session: Any, inputs: Arrays, output_names: list[str], device_type: str, device_id: int) -> Arrays:
    """One run through an IOBinding: each input copied to the device once, each output copied back once."""
    binding = session.io_binding()
    for name, arr in inputs.items():
        # Bound by address: the memory must be contiguous (the binding keeps the array alive).
        binding.bind_cpu_input(name, np.ascontiguousarray(arr))
    for name in output_names:
        # onnxruntime allocates outputs on the device itself, so their shapes need not be known here.
        binding.bind_output(name, device_type, device_id)
    session.run_with_iobinding(binding)
    return dict(zip(output_names, binding.copy_outputs_to_cpu(), strict=True))


class StaticBinding:
    """Device buffers for the one batch shape of a model, allocated and bound once; each batch is
    copied into the input buffers in place, so every run uses the addresses a CUDA graph captured."""

    def __init__(self, session: Any, model: ModelSettings, device_type: str, device_id: int) -> None:
        ort = _ort()
        self.session = session
        self.shapes, out_shapes = graph_shapes(model)
        self.dtypes = {t.name: t.dtype.numpy for t in model.inputs}

        def alloc(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device_type, device_id)

        self.inputs = {t.name: alloc(self.shapes[t.name], t.dtype.numpy) for t in model.inputs}
        self.outputs = {t.name: alloc(out_shapes[t.name], t.dtype.numpy) for t in model.outputs}
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry(GRAPH_ID_KEY, GRAPH_ID)
        # On the CPU device, reading an output returns a view of its buffer, which the next batch overwrites.
        self.copy_out = device_type == "cpu"

    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays:
        for name, value in self.inputs.items():
            arr = inputs[name]
            if arr.shape != self.shapes[name]:
                raise Internal(f"input {name!r} has shape {list(arr.shape)}, but the model's CUDA graph was "
                               f"captured for {list(self.shapes[name])}")
            # update_inplace checks the element count, not the type: convert, or the bytes would be misread.
            value.update_inplace(np.ascontiguousarray(arr, dtype=self.dtypes[name]))
        self.session.run_with_iobinding(self.binding, self.run_options)
        values = {name: self.outputs[name].numpy() for name in output_names}
        return {name: v.copy() for name, v in values.items()} if self.copy_out else values

    def warm_up(self) -> None:
        zeros = {name: np.zeros(shape, self.dtypes[name]) for name, shape in self.shapes.items()}
        # The first run captures; the second replays, so a graph that cannot replay fails at load too.
        for _ in range(2):
            self.run(zeros, [])


def refuse_unservable(mv: ModelVersion) -> None:
    tensors = (*mv.settings.inputs, *mv.settings.outputs)
    text = [t.name for t in tensors if t.dtype.is_bytes]
    if text:
        raise ConfigError(f"{mv.model_file}: tensors {text} are BYTES (ONNX strings), which cannot be placed in GPU "
                          "memory; serve this model from a cpu pool (parameters ferry.pools)")
    bf16 = [t.name for t in tensors if t.dtype.name == "BF16"]
    if bf16:
        # As on the CPU pool: onnxruntime's Python API has no numpy type to read BF16 outputs into.
        raise ConfigError(f"{mv.model_file}: tensors {bf16} are BF16, which the onnxruntime GPU pool cannot serve")


class OnnxGpuRuntime:
    def __init__(self, mv: ModelVersion, settings: WorkerSettings) -> None:
        refuse_unservable(mv)
        providers = provider_options(settings, mv.settings)
        ort = _ort()
        available = list(ort.get_available_providers())
        if CUDA not in available:
            raise ConfigError(f"{mv.model_file}: the onnx-gpu runtime needs onnxruntime-gpu, but the installed "
                              f"onnxruntime is a build without CUDA (providers: {available}): {INSTALL_HINT}")
        if settings.tensorrt and TENSORRT not in available:
            raise ConfigError(f"{mv.model_file}: --tensorrt needs onnxruntime's {TENSORRT}, which this onnxruntime "
                              f"lacks (it offers {available}); use the onnxruntime-gpu package, or drop --tensorrt")
        if settings.trt_engine_cache_path:
            try:
                Path(settings.trt_engine_cache_path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"trt_engine_cache_path {settings.trt_engine_cache_path!r}: {exc}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.devices = [f"cuda:{settings.device_id}"]
        try:
            # enable_fallback=0: otherwise a provider that fails to start is retried on the CPU, silently.
            self.session = ort.InferenceSession(str(mv.model_file), sess_options=opts, providers=providers,
                                                enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"{mv.model_file}: onnxruntime cannot load it on {self.devices[0]}: {exc}") from None
        self.session.disable_fallback()  # the same at run time, on onnxruntime versions without the keyword
        check_active(self.session.get_providers(), [name for name, _ in providers], mv.model_file)
        self.device_id = settings.device_id
        self.graph: StaticBinding | None = None
        if settings.cuda_graph:
            try:
                self.graph = StaticBinding(self.session, mv.settings, "cuda", settings.device_id)
                self.graph.warm_up()
            except Exception as exc:  # out of device memory, or a graph onnxruntime cannot capture
                raise ConfigError(f"{mv.model_file}: CUDA graph capture failed: {exc}") from None
        log.info("model %s v%d on %s: providers %s%s", mv.name, mv.version, self.devices[0],
                 ", ".join(self.session.get_providers()), ", CUDA graph captured" if self.graph else "")

    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays:
        if self.graph is not None:
            return self.graph.run(inputs, output_names)
        return run_bound(self.session, inputs, output_names, "cuda", self.device_id)
