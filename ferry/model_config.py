"""Load and validate one model's ``config.pbtxt`` (Triton's text format).

Ferry reads the same ``inference.ModelConfig`` schema as Triton, accepts the
subset of fields it implements, and fails at load with ``<file>: <field>: why``
for anything else, so a config that would silently mean something different
here never serves traffic.  Inputs and outputs the config omits are filled
from the ONNX graph; the ones it lists are checked against the graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from ferry import datatypes
from ferry.errors import ConfigError
from protos import model_config_pb2 as mc

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"

# Ferry's own settings live in config `parameters` under these keys.
PARAM_POOLS = "ferry.pools"
PARAM_BATCH_SIZES = "ferry.batch_sizes"
PARAM_SHAPE_BUCKETS = "ferry.shape_buckets"
PARAM_NEURON_DYNAMIC_BATCH = "ferry.neuron_dynamic_batch"
KNOWN_PARAMETERS = {
    PARAM_POOLS: "worker pools that may run this model, each with its cost per worker-hour, e.g. "
                 "\"cpu=0.17,gpu=1.21\" (default: cpu, or gpu for an instance_group of KIND_GPU; cost "
                 "1.0 when left out); the broker prefers the cheapest pool that meets the deadlines",
    PARAM_BATCH_SIZES: "batch sizes a compiled model accepts, e.g. \"1,4,8\" (static shapes: Inferentia, TensorRT "
                       "profiles, CUDA graphs); each batch is padded to the smallest listed size >= its rows",
    PARAM_SHAPE_BUCKETS: "per-input sizes for variable dims, e.g. \"tokens=16,32;mask=16,32\"; each variable dim is "
                         "padded (0 / empty bytes) to the smallest size >= its length, one bucket per batch",
    PARAM_NEURON_DYNAMIC_BATCH: "\"true\" when the Neuron artifact was compiled with torch_neuronx.dynamic_batch "
                                "(it then splits any batch into its compiled size itself)",
}
DEFAULT_POOL_COST = 1.0
POOL_NAME_RE = r"[a-z0-9][a-z0-9_-]{0,62}"

# Triton reads max_queue_size 0 as "unbounded".  Ferry's queues live in the
# Redis memory every model shares, so one overloaded model could exhaust it for
# all: 0 means this bound instead, and a config that wants more says so.
DEFAULT_MAX_QUEUE_SIZE = 4096

_SUPPORTED_TOP = {
    "name", "platform", "backend", "max_batch_size", "input", "output",
    "dynamic_batching", "instance_group", "version_policy", "parameters",
    "default_model_filename",
}
_SUPPORTED_BATCHING = {
    "preferred_batch_size", "max_queue_delay_microseconds", "priority_levels", "default_priority_level",
    "default_queue_policy",
}
# Unsupported fields that have a replacement get a pointer to it, not just the supported list.
_BATCHING_INSTEAD = {
    "priority_queue_policy": "per-level queue policies are not supported; use default_queue_policy, "
                             "which applies to every priority level",
    "preserve_ordering": "not supported; each ModelInfer call gets its own response, and ModelStreamInfer "
                         "answers as requests complete: match stream responses to requests by their `id`",
}
_SUPPORTED_QUEUE_POLICY = {"timeout_action", "default_timeout_microseconds", "allow_timeout_override", "max_queue_size"}
_SUPPORTED_TENSOR = {"name", "data_type", "dims"}
_SUPPORTED_INSTANCE = {"name", "kind", "count"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: datatypes.DataType
    dims: tuple[int, ...]  # without the batch dimension; -1 = any size


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """dynamic_batching.default_queue_policy (Triton's ModelQueuePolicy) as plain values."""

    timeout_action: str  # "REJECT" or "DELAY" (Triton's ModelQueuePolicy.TimeoutAction)
    default_timeout_us: int  # 0 = no queue timeout
    allow_timeout_override: bool  # a request's `timeout` parameter may LOWER the timeout
    max_queue_size: int  # effective bound, always > 0: config 0 (Triton's "unlimited") -> DEFAULT_MAX_QUEUE_SIZE


@dataclass(frozen=True, slots=True)
class PoolChoice:
    """A pool a model may run on, and what one of its workers costs per hour (any currency)."""

    name: str
    cost: float


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What the rest of Ferry needs from a validated config, as plain values."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    pools: tuple[PoolChoice, ...]  # where it may run, cheapest first
    config: Any  # the completed mc.ModelConfig, served by the ModelConfig RPC
    priority_levels: int  # dynamic_batching.priority_levels, 0 = priorities off
    default_priority_level: int  # 1..priority_levels (1 is the HIGHEST priority, as in Triton); 0 when off
    queue_policy: QueuePolicy
    static_batch_sizes: tuple[int, ...]  # ferry.batch_sizes: sorted, unique; () = any batch size
    shape_buckets: tuple[tuple[str, tuple[int, ...]], ...]  # ferry.shape_buckets: (input, sorted sizes), by name
    neuron_dynamic_batch: bool = False

    @property
    def pool_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pools)


def bucket_dims(dims: tuple[int, ...], spec_dims: tuple[int, ...], buckets: tuple[int, ...]) -> tuple[int, ...]:
    """``dims`` with each variable (-1 in ``spec_dims``) one rounded up to the smallest bucket that
    holds it; one beyond the largest bucket stays as it is (the gateway rejects those)."""
    return tuple(
        next((b for b in buckets if b >= d), d) if want == -1 else d
        for d, want in zip(dims, spec_dims, strict=True)
    )


def _fail(path: Path, field: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: {field}: {why}")


def parse_config_text(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read model config: {exc.strerror}") from None
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # The parser's "Value out of range: -1" does not say why a count cannot be negative.
        hint = " (this field is unsigned: use 0 or more)" if "out of range: -" in str(exc) else ""
        raise ConfigError(f"{path}: {exc}{hint}") from None
    return config


def _check_fields(path: Path, prefix: str, msg: Any, allowed: set[str]) -> None:
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise _fail(
                path, prefix + fd.name,
                f"not supported by Ferry (supported here: {', '.join(sorted(allowed))})",
            )


def _queue_policy(path: Path, policy: Any) -> QueuePolicy:
    where = "dynamic_batching.default_queue_policy."
    _check_fields(path, where, policy, _SUPPORTED_QUEUE_POLICY)
    actions = mc.ModelQueuePolicy.TimeoutAction
    # Text format accepts any number for an open (proto3) enum, not only the names.
    if policy.timeout_action not in actions.values():
        raise _fail(path, where + "timeout_action",
                    f"{policy.timeout_action} is not a timeout action; use REJECT or DELAY")
    return QueuePolicy(
        timeout_action=actions.Name(policy.timeout_action),
        default_timeout_us=int(policy.default_timeout_microseconds),
        allow_timeout_override=bool(policy.allow_timeout_override),
        max_queue_size=int(policy.max_queue_size) or DEFAULT_MAX_QUEUE_SIZE,
    )


def _priorities(path: Path, db: Any) -> tuple[int, int]:
    levels, default = int(db.priority_levels), int(db.default_priority_level)
    where = "dynamic_batching.default_priority_level"
    if levels == 0 and default != 0:
        raise _fail(path, where, f"{default} but priority_levels is 0 (priorities off); set priority_levels "
                    f"to at least {default}, or remove default_priority_level")
    if levels > 0 and not 1 <= default <= levels:
        raise _fail(path, where, f"{default} must be between 1 and priority_levels ({levels}): it is the level of "
                    f"requests that set no priority (1 is the highest priority), e.g. {levels}")
    return levels, default


def _sizes(path: Path, field: str, text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, as a sorted tuple without duplicates."""
    if not text.strip():
        raise _fail(path, field, 'no sizes; list them comma-separated, e.g. "1,4,8", or remove the parameter')
    sizes: set[int] = set()
    for item in text.split(","):
        if not re.fullmatch(r"[0-9]+", item.strip()) or int(item) < 1:
            raise _fail(path, field, f"{item.strip()!r} is not a positive integer; "
                        'list sizes comma-separated, e.g. "1,4,8"')
        sizes.add(int(item))
    return tuple(sorted(sizes))


def _batch_sizes(path: Path, text: str, max_batch: int) -> tuple[int, ...]:
    field = f"parameters[{PARAM_BATCH_SIZES!r}]"
    if max_batch == 0:
        raise _fail(path, field, "requires max_batch_size > 0 (it lists the batch sizes a batch is padded to)")
    sizes = _sizes(path, field, text)
    if sizes[-1] > max_batch:
        raise _fail(path, field, f"{sizes[-1]} is larger than max_batch_size ({max_batch}); "
                    "remove it or raise max_batch_size")
    # A batch (or one request) may hold up to max_batch_size rows; it needs a size to pad to.
    if sizes[-1] != max_batch:
        raise _fail(path, field, f"largest size {sizes[-1]} must equal max_batch_size ({max_batch}) so that every "
                    f"batch has a size to pad to; add {max_batch}, or set max_batch_size: {sizes[-1]}")
    return sizes


def _shape_buckets(path: Path, text: str, inputs: list[TensorSpec]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    field = f"parameters[{PARAM_SHAPE_BUCKETS!r}]"
    by_name = {t.name: t for t in inputs}
    buckets: dict[str, tuple[int, ...]] = {}
    for entry in text.split(";"):
        name, eq, sizes = (s.strip() for s in entry.partition("="))
        if not name or not eq:
            raise _fail(path, field, f"{entry.strip()!r} is not input=size,size,...; "
                        'separate inputs with ";", e.g. "tokens=16,32;mask=16,32"')
        if name in buckets:
            raise _fail(path, field, f"input {name!r} is listed twice; give it one list of sizes")
        spec = by_name.get(name)
        if spec is None:
            raise _fail(path, field, f"{name!r} is not an input of the model (inputs: {', '.join(by_name)})")
        if -1 not in spec.dims:
            raise _fail(path, field, f"input {name!r} has fixed dims {list(spec.dims)}, so there is nothing to pad; "
                        "buckets apply to variable (-1) dims: remove it from the parameter")
        buckets[name] = _sizes(path, f"{field}: input {name!r}", sizes)
    return tuple(sorted(buckets.items()))


def _onnx_io(model_file: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (minus initializers) and outputs, with full shapes (-1 = dynamic)."""
    import onnx

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises several unrelated types on bad files
        raise ConfigError(f"{model_file}: not a readable ONNX model: {exc}") from None
    inits = {i.name for i in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        tt = v.type.tensor_type
        name = datatypes.ONNX_TO_OIP.get(tt.elem_type)
        if name is None:
            raise ConfigError(f"{model_file}: tensor {v.name!r} has unsupported ONNX type {tt.elem_type}")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        return TensorSpec(v.name, datatypes.BY_NAME[name], dims)

    ins = [spec(v) for v in model.graph.input if v.name not in inits]
    outs = [spec(v) for v in model.graph.output]
    return ins, outs


def _merge_io(
    path: Path, kind: str, declared: Any, graph: list[TensorSpec], max_batch: int, model_file: Path
) -> list[TensorSpec]:
    by_name = {t.name: t for t in graph}
    result: list[TensorSpec] = []
    seen: set[str] = set()
    for i, t in enumerate(declared):
        where = f"{kind}[{i}]"
        _check_fields(path, where + ".", t, _SUPPORTED_TENSOR)
        if t.name in seen:
            raise _fail(path, where, f"duplicate {kind} name {t.name!r}")
        seen.add(t.name)
        g = by_name.get(t.name)
        if g is None:
            raise _fail(path, where, f"{t.name!r} is not a {kind} of {model_file.name} "
                        f"(graph has: {', '.join(by_name) or 'none'})")
        type_name = mc.DataType.Name(t.data_type)
        dtype = datatypes.BY_CONFIG_NAME.get(type_name)
        if dtype is None:
            raise _fail(path, where + ".data_type", f"{type_name} is not a servable datatype")
        if dtype is not g.dtype:
            raise _fail(path, where + ".data_type",
                        f"{type_name} but the ONNX graph says {g.dtype.config_name}")
        dims = tuple(int(d) for d in t.dims)
        graph_dims = _strip_batch(path, where, g, max_batch)
        if len(dims) != len(graph_dims) or any(
            a != b and a != -1 and b != -1 for a, b in zip(dims, graph_dims, strict=False)
        ):
            raise _fail(path, where + ".dims",
                        f"{list(dims)} does not match the ONNX graph's {list(graph_dims)}"
                        + (" (dims exclude the batch dimension)" if max_batch > 0 else ""))
        if any(d < -1 or d == 0 for d in dims):
            raise _fail(path, where + ".dims", f"{list(dims)}: each dim must be positive or -1")
        # The graph may be stricter than the config: use the most specific dims.
        merged = tuple(b if a == -1 else a for a, b in zip(dims, graph_dims, strict=True))
        result.append(TensorSpec(t.name, dtype, merged))
    for g in graph:
        if g.name not in seen:
            result.append(TensorSpec(g.name, g.dtype, _strip_batch(path, kind, g, max_batch)))
    return result


def _strip_batch(path: Path, where: str, g: TensorSpec, max_batch: int) -> tuple[int, ...]:
    if max_batch <= 0:
        return g.dims
    if not g.dims or (g.dims[0] != -1 and g.dims[0] < max_batch):
        raise _fail(path, "max_batch_size",
                    f"{max_batch} but ONNX tensor {g.name!r} has shape {list(g.dims)}; with "
                    "batching its first dimension must be dynamic (or set max_batch_size: 0)")
    return g.dims[1:]


def load_model_settings(model_dir: Path, model_file: Path) -> ModelSettings:
    """Validate ``<model_dir>/config.pbtxt`` against the ONNX file of one version."""
    path = model_dir / "config.pbtxt"
    config = parse_config_text(path)
    _check_fields(path, "", config, _SUPPORTED_TOP)
    name = config.name or model_dir.name
    if name != model_dir.name:
        raise _fail(path, "name", f"{name!r} must match its directory name {model_dir.name!r}")
    if config.platform not in ("", ONNX_PLATFORM):
        raise _fail(path, "platform", f"{config.platform!r} is not supported; use {ONNX_PLATFORM!r}")
    if config.backend not in ("", ONNX_BACKEND):
        raise _fail(path, "backend", f"{config.backend!r} is not supported; use {ONNX_BACKEND!r}")
    if config.max_batch_size < 0:
        raise _fail(path, "max_batch_size", "must be >= 0 (0 disables batching)")
    max_batch = int(config.max_batch_size)

    db = config.dynamic_batching
    for fd, _ in db.ListFields():
        if fd.name in _BATCHING_INSTEAD:
            raise _fail(path, f"dynamic_batching.{fd.name}", _BATCHING_INSTEAD[fd.name])
    _check_fields(path, "dynamic_batching.", db, _SUPPORTED_BATCHING)
    preferred = tuple(int(x) for x in db.preferred_batch_size)
    for x in preferred:
        if x < 1 or (max_batch and x > max_batch):
            raise _fail(path, "dynamic_batching.preferred_batch_size",
                        f"{x} must be between 1 and max_batch_size ({max_batch})")
    if config.HasField("dynamic_batching") and max_batch == 0:
        raise _fail(path, "dynamic_batching", "requires max_batch_size > 0")
    priority_levels, default_priority = _priorities(path, db)
    queue_policy = _queue_policy(path, db.default_queue_policy)

    for i, group in enumerate(config.instance_group):
        _check_fields(path, f"instance_group[{i}].", group, _SUPPORTED_INSTANCE)
        if group.kind not in (mc.ModelInstanceGroup.KIND_AUTO, mc.ModelInstanceGroup.KIND_CPU,
                              mc.ModelInstanceGroup.KIND_GPU):
            raise _fail(path, f"instance_group[{i}].kind",
                        f"{mc.ModelInstanceGroup.Kind.Name(group.kind)} has no Ferry pool; use KIND_CPU, "
                        "KIND_GPU or KIND_AUTO, or name pools with parameters ferry.pools")
        if group.count > 1:
            raise _fail(path, f"instance_group[{i}].count",
                        "a worker runs one instance of each model; scale with more workers "
                        "(`ferry up --workers N`, or more `ferry worker` processes)")
        if group.count < 0:
            raise _fail(path, f"instance_group[{i}].count", "must be >= 0")

    params: dict[str, str] = {}
    for key, value in config.parameters.items():
        if key not in KNOWN_PARAMETERS:
            known = "; ".join(f"{k}: {v}" for k, v in KNOWN_PARAMETERS.items())
            raise _fail(path, f"parameters[{key!r}]", f"unknown parameter (known: {known})")
        params[key] = value.string_value
    gpu_group = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
    pools = _pools(path, params.get(PARAM_POOLS, "gpu" if gpu_group else "cpu"))
    dynamic = params.get(PARAM_NEURON_DYNAMIC_BATCH, "false").strip().lower()
    if dynamic not in ("true", "false"):
        raise _fail(path, f"parameters[{PARAM_NEURON_DYNAMIC_BATCH!r}]", f"{dynamic!r} is not true or false")
    batch_sizes = _batch_sizes(path, params[PARAM_BATCH_SIZES], max_batch) if PARAM_BATCH_SIZES in params else ()

    graph_in, graph_out = _onnx_io(model_file)
    inputs = _merge_io(path, "input", config.input, graph_in, max_batch, model_file)
    outputs = _merge_io(path, "output", config.output, graph_out, max_batch, model_file)
    # Buckets name inputs and need their final dims, known only once the graph has filled them in.
    buckets = _shape_buckets(path, params[PARAM_SHAPE_BUCKETS], inputs) if PARAM_SHAPE_BUCKETS in params else ()

    completed = mc.ModelConfig()
    completed.CopyFrom(config)
    completed.name = name
    completed.platform = ONNX_PLATFORM
    completed.backend = ONNX_BACKEND
    del completed.input[:]
    del completed.output[:]
    for t in inputs:
        completed.input.add(name=t.name, data_type=mc.DataType.Value(t.dtype.config_name), dims=t.dims)
    for t in outputs:
        completed.output.add(name=t.name, data_type=mc.DataType.Value(t.dtype.config_name), dims=t.dims)

    return ModelSettings(
        name=name,
        max_batch_size=max_batch,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        preferred_batch_sizes=preferred,
        pools=pools,
        config=completed,
        priority_levels=priority_levels,
        default_priority_level=default_priority,
        queue_policy=queue_policy,
        static_batch_sizes=batch_sizes,
        shape_buckets=buckets,
        neuron_dynamic_batch=dynamic == "true",
    )


def _pools(path: Path, spec: str) -> tuple[PoolChoice, ...]:
    """``ferry.pools``: ``name[=cost]`` items, comma-separated; cheapest first (ties by name)."""
    field = f"parameters[{PARAM_POOLS!r}]"
    seen: dict[str, float] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            raise _fail(path, field, f"{spec!r}: an empty item; use name=cost,name=cost")
        name, _, cost_text = (x.strip() for x in item.partition("="))
        if not re.fullmatch(POOL_NAME_RE, name):
            raise _fail(path, field, f"{name!r} is not a valid pool name (lowercase letters, digits, '-', '_')")
        if name in seen:
            raise _fail(path, field, f"pool {name!r} is listed twice")
        try:
            cost = float(cost_text) if cost_text else DEFAULT_POOL_COST
        except ValueError:
            raise _fail(path, field, f"pool {name!r}: cost {cost_text!r} is not a number") from None
        if not (cost >= 0 and cost != float("inf")):
            raise _fail(path, field, f"pool {name!r}: cost {cost_text!r} must be a finite number >= 0")
        seen[name] = cost
    return tuple(sorted((PoolChoice(n, c) for n, c in seen.items()), key=lambda p: (p.cost, p.name)))
