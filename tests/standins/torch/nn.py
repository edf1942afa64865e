"""STAND-IN for tests only — not the real library; verifies Ferry's adapter contract, not Neuron behaviour.

``nn.Module`` (``__call__`` runs ``forward``, ``eval()``) and ``Program``, a
stand-in model whose forward is one of the known numpy computations in
``torch.jit.PROGRAMS``, so that a stand-in trace can record it by name.
"""

from __future__ import annotations

from typing import Any


class Module:
    training = True

    def __call__(self, *args: Any) -> Any:
        return self.forward(*args)

    def forward(self, *args: Any) -> Any:
        raise NotImplementedError

    def eval(self) -> Module:
        self.training = False
        return self


class Program(Module):
    """A model whose computation is ``torch.jit.PROGRAMS[name]``."""

    def __init__(self, name: str) -> None:
        from torch.jit import PROGRAMS

        if name not in PROGRAMS:
            raise ValueError(f"stand-in program {name!r} unknown (known: {', '.join(PROGRAMS)})")
        self.program = name

    def forward(self, *args: Any) -> Any:
        from torch.jit import run_program

        return run_program(self.program, args)
