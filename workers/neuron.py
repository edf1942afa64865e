"""Neuron runtime: a TorchScript model compiled by torch-neuronx for AWS Inferentia2 / Trainium.

The compiled artifact is ``<version dir>/model.neuron.pt`` (``NEURON_MODEL_FILE``,
written by ``scripts/compile_neuron.py``); the version's ``model.onnx`` stays
the model's interface description, from which Ferry reads tensor names, types
and shapes as for every pool.  Inputs go to the module positionally, in the
config's input order; its result (one tensor, a tuple in the config's output
order, or a dict by output name) is mapped back to the config's outputs.

A traced Neuron model accepts only the shapes it was compiled with.  A batched
model therefore needs its compiled batch size as ``ferry.batch_sizes`` (the
worker pads every batch up to it, workers/batch.py), unless it was compiled
with ``torch_neuronx.dynamic_batch`` and says so with
``ferry.neuron_dynamic_batch: "true"``.  Both are checked at load, as are the
datatypes torch cannot take from numpy.  See docs/neuron.md.

Written from the Neuron SDK documentation; tested only against the stand-ins
in tests/standins (no Neuron hardware or SDK on the build machine).
"""

from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ferry.errors import ConfigError, Internal
from ferry.model_config import PARAM_BATCH_SIZES, PARAM_NEURON_DYNAMIC_BATCH
from ferry.repository import ModelVersion
from ferry.settings import WorkerSettings
from workers.runtime import Arrays

log = logging.getLogger("ferry.worker")

NEURON_MODEL_FILE = "model.neuron.pt"
NEURON_META_FILE = "model.neuron.json"  # written by scripts/compile_neuron.py: compiled batch size, dynamic or not
VISIBLE_CORES_ENV = "NEURON_RT_VISIBLE_CORES"
DEV_GLOB = "/dev/neuron*"
NEURON_LS = "neuron-ls"
INSTALL_HINT = (
    "install torch-neuronx from AWS's pip repository (pip install torch-neuronx "
    "--extra-index-url https://pip.repos.neuron.amazonaws.com) on an inf2/trn1/trn2 instance whose Neuron "
    "driver and runtime (aws-neuronx-dkms, aws-neuronx-runtime-lib) are installed, e.g. the Neuron DLAMI"
)
# numpy has no bfloat16, and torch supports unsigned types beyond uint8 only partly (not verified on Neuron).
UNSUPPORTED = {"BYTES": "torch has no string tensors", "BF16": "numpy has no bfloat16",
               "UINT16": "torch supports it only partly", "UINT32": "torch supports it only partly",
               "UINT64": "torch supports it only partly"}


class NeuronRuntime:
    devices: list[str]

    def __init__(self, mv: ModelVersion, settings: WorkerSettings) -> None:
        self.mv = mv
        self.config_file = mv.model_file.parent.parent / "config.pbtxt"
        self.input_names = [t.name for t in mv.settings.inputs]
        self.output_specs = {t.name: t for t in mv.settings.outputs}
        bad = [f"{t.name} ({t.dtype.name}: {UNSUPPORTED[t.dtype.name]})"
               for t in (*mv.settings.inputs, *mv.settings.outputs) if t.dtype.name in UNSUPPORTED]
        if bad:
            raise ConfigError(f"{self.config_file}: the neuron pool cannot serve tensors {', '.join(bad)}; "
                              "take FP32/INT32/INT64 at the model's edge and convert inside it")
        artifact = mv.model_file.parent / NEURON_MODEL_FILE
        meta = _read_meta(artifact.parent / NEURON_META_FILE)
        self.dynamic_batch = mv.settings.neuron_dynamic_batch
        self._check_batching(meta)
        if not artifact.is_file():
            raise ConfigError(f"{artifact}: missing; compile the model for Neuron with scripts/compile_neuron.py "
                              f"--out {artifact.parent} (see docs/neuron.md)")

        cores = settings.neuron_cores or os.environ.get(VISIBLE_CORES_ENV, "")
        self.torch, neuronx = _import_neuron(settings.neuron_cores)
        found = neuron_devices()
        if not found:
            raise ConfigError(f"no Neuron device (nothing matches {DEV_GLOB}): run the neuron pool on an "
                              f"inf2/trn1/trn2 instance with the Neuron driver loaded; {INSTALL_HINT}")
        self.devices = [f"neuroncore:{i}" for i in _expand(cores)] or found
        missing = [d for d in self.devices if found[0].startswith("neuroncore:") and d not in found]
        if missing:
            raise ConfigError(f"NeuronCores {cores!r} include {', '.join(missing)}, but this instance has "
                              f"{found[0]}..{found[-1]} (neuron-ls)")
        try:
            module = self.torch.jit.load(str(artifact))
        except Exception as exc:  # torch raises RuntimeError and friends on bad or foreign artifacts
            raise ConfigError(f"{artifact}: torch.jit.load cannot load it: {exc}") from None
        if self.dynamic_batch:
            # dynamic_batch changes the module in place; the SDK documents applying it to a
            # traced or loaded module, not whether the setting survives torch.jit.save, so it is
            # applied again here.
            module = neuronx.dynamic_batch(module)
        self.module = module
        self._warm_up(meta)

    def _check_batching(self, meta: Mapping[str, Any]) -> None:
        s = self.mv.settings
        compiled = meta.get("batch_size")
        if s.max_batch_size == 0 or self.dynamic_batch:
            return  # no batch dimension (shapes are fixed by the config), or any batch is split into chunks
        sizes = s.static_batch_sizes
        where = f"{self.config_file}: model {s.name!r}"
        if not sizes:
            size = str(compiled) if compiled else "<compiled size>"
            extra = ""
            if meta.get("dynamic_batch"):
                extra = (f" (the artifact was compiled with --dynamic-batch: add parameters {{ key: "
                         f'"{PARAM_NEURON_DYNAMIC_BATCH}" value {{ string_value: "true" }} }})')
            raise ConfigError(
                f"{where}: a Neuron model runs only the batch size it was compiled for, and max_batch_size is "
                f"{s.max_batch_size} with no compiled size: add parameters {{ key: \"{PARAM_BATCH_SIZES}\" "
                f"value {{ string_value: \"{size}\" }} }} and set max_batch_size to it, or compile with "
                f"dynamic batching (scripts/compile_neuron.py --dynamic-batch){extra}")
        if len(sizes) > 1:
            raise ConfigError(f"{where}: {PARAM_BATCH_SIZES} lists {list(sizes)}, but {NEURON_MODEL_FILE} is "
                              "compiled for one batch size: list only that size, or compile with --dynamic-batch")
        if compiled and sizes != (compiled,):
            raise ConfigError(f"{where}: {PARAM_BATCH_SIZES} is {sizes[0]} but {NEURON_MODEL_FILE} was compiled "
                              f"for batch size {compiled} ({NEURON_META_FILE}); make them agree")

    def _warm_up(self, meta: Mapping[str, Any]) -> None:
        """One run on zeros at load: the first Neuron execution is slow (the model is placed on its
        NeuronCore), and a module whose outputs do not match the config fails here, not per batch."""
        s = self.mv.settings
        if any(-1 in t.dims for t in s.inputs):
            return  # no one shape to try
        rows = (s.static_batch_sizes or (int(meta.get("batch_size") or 1),))[0]
        batch = (rows,) if s.max_batch_size > 0 else ()
        zeros = {t.name: np.zeros((*batch, *t.dims), dtype=t.dtype.numpy) for t in s.inputs}
        try:
            self.run(zeros, list(self.output_specs))
        except Exception as exc:
            raise ConfigError(f"{self.mv.model_file.parent / NEURON_MODEL_FILE}: a warm-up run on zeros "
                              f"of the config's shapes failed: {exc}") from None

    def run(self, inputs: Arrays, output_names: list[str]) -> Arrays:
        torch = self.torch
        # Positional, in config order: a traced module has no input names.  from_numpy shares
        # memory; batches joined from raw request bytes are read-only, which torch warns about.
        args = [torch.from_numpy(_writable(inputs[name])) for name in self.input_names]
        with torch.no_grad():
            result = self.module(*args)
        by_name = self._outputs(result)
        return {name: self._array(name, by_name[name]) for name in output_names}

    def _outputs(self, result: Any) -> dict[str, Any]:
        names = list(self.output_specs)
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise Internal(f"model returned outputs {sorted(result)}; the config's {missing} are not among them")
            return dict(result)
        if isinstance(result, (tuple, list)):
            if len(result) != len(names):
                raise Internal(f"model returned {len(result)} outputs; the config has {len(names)} ({names})")
            return dict(zip(names, result, strict=True))
        if len(names) != 1:
            raise Internal(f"model returned one tensor; the config has {len(names)} outputs ({names})")
        return {names[0]: result}

    def _array(self, name: str, tensor: Any) -> np.ndarray[Any, Any]:
        arr: np.ndarray[Any, Any] = tensor.detach().cpu().numpy()
        want = self.output_specs[name].dtype
        if arr.dtype != want.numpy:
            raise Internal(f"output {name!r} is {arr.dtype} but the config says {want.name}: "
                           "cast it in the model before tracing")
        return arr


def _import_neuron(cores: str) -> tuple[Any, Any]:
    """torch and torch_neuronx, with NEURON_RT_VISIBLE_CORES set first.

    The Neuron runtime reserves NeuronCores for the whole process when it initialises
    (all of them unless NEURON_RT_VISIBLE_CORES says otherwise, and a reserved core cannot be
    used by another process), and reads the variable only then.  Setting it before torch_neuronx
    is imported is the only point that is surely early enough.
    """
    if cores:
        before = os.environ.get(VISIBLE_CORES_ENV)
        if "torch_neuronx" in sys.modules and before != cores:
            raise ConfigError(f"torch_neuronx was imported before Ferry could set {VISIBLE_CORES_ENV}={cores} "
                              f"(it was {before!r}); set it in the worker's environment instead of neuron_cores")
        if before not in (None, cores):
            log.warning("neuron_cores %s overrides %s=%s from the environment", cores, VISIBLE_CORES_ENV, before)
        os.environ[VISIBLE_CORES_ENV] = cores
    try:
        # importlib, not `import torch`: these exist only on Neuron hosts, so the type checker
        # sees them as Any.  Importing torch_neuronx registers the Neuron ops that
        # torch.jit.load needs to deserialise a compiled model.
        torch = importlib.import_module("torch")
        neuronx = importlib.import_module("torch_neuronx")
    except (ImportError, OSError) as exc:  # OSError: a shared library (libnrt) failed to load
        raise ConfigError(f"the neuron pool needs torch-neuronx, which cannot be imported here ({exc}): "
                          f"{INSTALL_HINT}") from None
    return torch, neuronx


def neuron_devices(dev_glob: str | None = None, neuron_ls: str | None = None) -> list[str]:
    """This host's NeuronCores as ``neuroncore:N``, counted by ``neuron-ls``; where neuron-ls is
    missing or unreadable, one ``neurondevice:N`` per ``/dev/neuronN``; [] without a device node."""
    nodes = [m.group(1) for p in glob.glob(dev_glob or DEV_GLOB) if (m := re.fullmatch(r"neuron(\d+)", Path(p).name))]
    if not nodes:
        return []
    cores = _neuron_ls_cores(neuron_ls or NEURON_LS)
    if cores:
        return [f"neuroncore:{i}" for i in range(cores)]
    return [f"neurondevice:{n}" for n in sorted(nodes, key=int)]


def _neuron_ls_cores(command: str) -> int:
    """Total NeuronCores (sum of each device's ``nc_count``), or 0 when unknown.

    ``--json-output`` prints a list of devices; the SDK announced that Neuron 2.34 replaces it
    with ``--output-format json``, which adds top-level fields, so both are tried and any list
    of device objects is accepted.
    """
    path = shutil.which(command)
    if path is None:
        return 0
    for args in (["--json-output"], ["--output-format", "json"]):
        try:
            done = subprocess.run([path, *args], capture_output=True, timeout=10, check=False)
            data = json.loads(done.stdout) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            continue
        if isinstance(data, Mapping):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if isinstance(data, list):
            counts = [d.get("nc_count") for d in data if isinstance(d, Mapping)]
            total = sum(c for c in counts if isinstance(c, int) and c > 0)
            if total:
                return total
    return 0


def _expand(cores: str) -> list[int]:
    """'0-1,3' -> [0, 1, 3]; [] for '' or a form this does not know (the environment's value
    is not validated by Ferry's settings; the devices then come from discovery)."""
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cores.replace(" ", "")):
        return []
    out: list[int] = []
    for part in cores.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    """What the compile script recorded; {} for an artifact compiled some other way."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); recompile, or delete it to skip its checks") from None
    return meta if isinstance(meta, dict) else {}


def _writable(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)
