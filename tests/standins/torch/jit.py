"""STAND-IN for tests only — not the real library; verifies Ferry's adapter contract, not Neuron behaviour.

``jit.save`` / ``jit.load`` of a stand-in "compiled" module.  The artifact is
a small JSON file naming a known numpy computation (``PROGRAMS``) and the
example shapes it was traced with; it holds no weights and no Neuron graph.
Like a model traced by torch-neuronx, a loaded module accepts only its traced
shapes unless ``torch_neuronx.dynamic_batch`` enabled it, in which case it
splits and pads the batch into chunks of the traced batch size (as the
torch-neuronx documentation describes).  Every load and call is recorded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "STAND-IN torch.jit artifact (tests/standins), not a real TorchScript file"

PROGRAMS: dict[str, Callable[..., Any]] = {
    "diff_prod": lambda a, b: (a - b, a * b),  # a tuple (diff, prod); a - b shows the argument order
    "diff_prod_dict": lambda a, b: {"prod": a * b, "diff": a - b},  # a dict, keys in another order
    "double": lambda a: a * 2,  # one tensor
}

LOADED: list[str] = []  # paths given to load(), in order


def run_program(name: str, args: tuple[Any, ...]) -> Any:
    for a in args:
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"expected Tensor arguments, got {type(a).__name__}")
    out = PROGRAMS[name](*(a.numpy() for a in args))
    if isinstance(out, dict):
        return {k: torch.Tensor(v) for k, v in out.items()}
    if isinstance(out, tuple):
        return tuple(torch.Tensor(v) for v in out)
    return torch.Tensor(out)


class ScriptModule:
    def __init__(self, program: str, example_shapes: list[list[int]], dynamic_batch: bool = False) -> None:
        self.program = program
        self.example_shapes = [tuple(s) for s in example_shapes]
        self.dynamic_batch = dynamic_batch
        self.calls: list[dict[str, Any]] = []  # each call's argument shapes and grad mode

    def __call__(self, *args: Any) -> Any:
        self.calls.append({"shapes": [list(a.shape) for a in args], "grad_enabled": torch.is_grad_enabled()})
        if len(args) != len(self.example_shapes):
            raise RuntimeError(f"expected {len(self.example_shapes)} inputs, got {len(args)}")
        if not self.dynamic_batch:
            for a, want in zip(args, self.example_shapes, strict=True):
                if a.shape != want:
                    raise RuntimeError(f"input shape {list(a.shape)} does not match the traced shape {list(want)}")
            return run_program(self.program, args)
        return self._chunked(args)

    def _chunked(self, args: tuple[Any, ...]) -> Any:
        chunk = self.example_shapes[0][0]
        rows = args[0].shape[0]
        for a, want in zip(args, self.example_shapes, strict=True):
            if a.shape[1:] != want[1:] or a.shape[0] != rows:
                raise ValueError(f"input shape {list(a.shape)} differs from the traced {list(want)} beyond dim 0")
        outs = []
        for i in range(math.ceil(rows / chunk)):
            part = []
            for a in args:
                piece = a.numpy()[i * chunk : (i + 1) * chunk]
                pad = np.zeros((chunk - len(piece), *piece.shape[1:]), dtype=piece.dtype)
                part.append(torch.Tensor(np.concatenate([piece, pad])))
            outs.append(run_program(self.program, tuple(part)))
        first = outs[0]

        def join(parts: list[Any]) -> Any:
            return torch.Tensor(np.concatenate([p.numpy() for p in parts])[:rows])

        if isinstance(first, dict):
            return {k: join([o[k] for o in outs]) for k in first}
        if isinstance(first, tuple):
            return tuple(join([o[j] for o in outs]) for j in range(len(first)))
        return join(outs)


def save(module: ScriptModule, path: str | Path) -> None:
    doc = {"standin": MARKER, "program": module.program, "example_shapes": [list(s) for s in module.example_shapes],
           "dynamic_batch": module.dynamic_batch}
    Path(path).write_text(json.dumps(doc))


def load(path: str | Path) -> ScriptModule:
    LOADED.append(str(path))
    doc = json.loads(Path(path).read_text())
    if doc.get("standin") != MARKER:
        raise RuntimeError(f"{path}: not a stand-in artifact")
    return ScriptModule(doc["program"], doc["example_shapes"], doc["dynamic_batch"])
