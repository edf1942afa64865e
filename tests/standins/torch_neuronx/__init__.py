"""STAND-IN for tests only — not the real library; verifies Ferry's adapter contract, not Neuron behaviour.

``trace`` and ``dynamic_batch`` with the signatures of torch-neuronx's
documented API; each call is recorded.  ``VISIBLE_CORES_AT_IMPORT`` records
``NEURON_RT_VISIBLE_CORES`` as it was when this module was first imported, so a
test can check that Ferry set it before the import.  Nothing is compiled.
"""

from __future__ import annotations

import os
from typing import Any

from torch.jit import ScriptModule

VISIBLE_CORES_AT_IMPORT = os.environ.get("NEURON_RT_VISIBLE_CORES")
TRACE_CALLS: list[dict[str, Any]] = []
DYNAMIC_BATCH_CALLS: list[ScriptModule] = []


def trace(
    func: Any,
    example_inputs: Any,
    *_: Any,
    input_output_aliases: dict[Any, Any] | None = None,
    compiler_workdir: str | None = None,
    compiler_args: str | list[str] | None = None,
    partitioner_config: Any = None,
    inline_weights_to_neff: bool = True,
    cpu_backend: bool = False,
) -> ScriptModule:
    examples = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    program = getattr(func, "program", None)
    if program is None:
        raise TypeError("stand-in trace needs a torch.nn.Program (or a loaded stand-in ScriptModule)")
    TRACE_CALLS.append({
        "program": program, "shapes": [list(e.shape) for e in examples],
        "dtypes": [str(e.dtype) for e in examples], "training": getattr(func, "training", False),
        "compiler_workdir": compiler_workdir, "compiler_args": compiler_args,
    })
    func(*examples)  # tracing runs the model once on the examples, as the real trace does
    return ScriptModule(program, [list(e.shape) for e in examples])


def dynamic_batch(neuron_script: ScriptModule) -> ScriptModule:
    if not isinstance(neuron_script, ScriptModule):
        raise TypeError("dynamic_batch takes the ScriptModule that trace() returned")
    DYNAMIC_BATCH_CALLS.append(neuron_script)
    neuron_script.dynamic_batch = True  # in place, returning the same module, as documented
    return neuron_script


__all__ = ["DYNAMIC_BATCH_CALLS", "TRACE_CALLS", "VISIBLE_CORES_AT_IMPORT", "dynamic_batch", "trace"]
