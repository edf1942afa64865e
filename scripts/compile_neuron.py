"""Compile a PyTorch model for AWS Inferentia2 / Trainium (torch-neuronx) into Ferry's model repository.

    python scripts/compile_neuron.py --module mypkg.models:build_mlp \\
        --input INPUT0:FP32:256 --batch-size 8 --out models/mlp/1
    python scripts/compile_neuron.py --torchscript bert.pt --input ids:INT64:128 --input mask:INT64:128 \\
        --batch-size 4 --dynamic-batch --compiler-args "--auto-cast matmult" --out models/bert/1

``--module pkg.mod:factory`` names a callable that returns the ``torch.nn.Module``
(in eval mode; ``eval()`` is called again anyway); ``--torchscript`` loads a
saved TorchScript file instead.  ``--input NAME:DTYPE:DIMS`` is repeated once
per model input, IN THE ORDER OF THE MODEL CONFIG'S INPUTS (Ferry passes them
positionally in that order); DTYPE is the config's name without ``TYPE_``
(FP32, INT64, ...), DIMS exclude the batch dimension (``3,224,224``; empty for
a scalar per row).  ``--batch-size`` is the batch the model is compiled for
(0: the model has no batch dimension and DIMS are its whole shape).

The script runs ``torch_neuronx.trace(model, example_inputs, compiler_args=...,
compiler_workdir=...)`` on zero tensors of those shapes, optionally
``torch_neuronx.dynamic_batch``, saves the result with ``torch.jit.save`` as
``<out>/model.neuron.pt``, records the compiled batch size in
``<out>/model.neuron.json`` (the worker checks the config against it), and
prints the ``config.pbtxt`` lines the model needs.  It needs torch-neuronx and
neuronx-cc (AWS's pip repository, https://pip.repos.neuron.amazonaws.com).

ONNX models cannot run on Neuron: torch-neuronx compiles PyTorch.  Re-export
from the original PyTorch code (best), or convert the ONNX file with
onnx2torch (``def build(): return onnx2torch.convert("model.onnx").eval()``, then
``--module mymod:build``; it covers a subset of ONNX operators).  Keep the
version's ``model.onnx`` either way: Ferry reads tensor names, types and shapes
from it for every pool.  See docs/neuron.md.

Written from the Neuron SDK documentation; run here only against the stand-ins in tests/standins.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ferry import model_config  # noqa: E402
from workers.neuron import INSTALL_HINT, NEURON_META_FILE, NEURON_MODEL_FILE  # noqa: E402

# Config datatype names (without TYPE_) -> torch dtype attribute names.  BYTES, BF16 and the
# wide unsigned types are left out: the neuron pool refuses them at load (workers/neuron.py).
TORCH_DTYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
                "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}


def _input(text: str) -> tuple[str, str, tuple[int, ...]]:
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME:DTYPE:DIMS, e.g. INPUT0:FP32:3,224,224")
    name, dtype, dims = parts
    dtype = dtype.upper().removeprefix("TYPE_")
    if dtype not in TORCH_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: datatype {dtype} (use one of {', '.join(TORCH_DTYPES)})")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: dims must be integers, e.g. 3,224,224") from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: a compiled model has fixed dims; each must be >= 1")
    return name, dtype, shape


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--module", help="pkg.mod:factory, a callable returning the torch.nn.Module")
    src.add_argument("--torchscript", type=Path, help="a TorchScript file (torch.jit.save) to compile")
    p.add_argument("--input", type=_input, action="append", required=True, metavar="NAME:DTYPE:DIMS",
                   help="one per model input, in the config's input order; DIMS without the batch dimension")
    p.add_argument("--batch-size", type=int, default=1, help="batch size to compile for (0: no batch dimension)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="torch_neuronx.dynamic_batch: accept any batch, run as chunks of --batch-size")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="with --dynamic-batch, the max_batch_size to print (default 4 x --batch-size)")
    p.add_argument("--compiler-args", default="", help='neuronx-cc arguments, e.g. "--auto-cast matmult"')
    p.add_argument("--compiler-workdir", default=None, help="keep neuronx-cc's intermediate files here")
    p.add_argument("--out", type=Path, required=True, help="the model version directory, <repo>/<model>/<version>")
    args = p.parse_args(argv)
    if args.batch_size < 0:
        p.error("--batch-size must be >= 0")
    if args.dynamic_batch and args.batch_size == 0:
        p.error("--dynamic-batch needs a batch dimension (--batch-size >= 1)")
    if args.module and ":" not in args.module:
        p.error("--module takes pkg.mod:factory")
    return args


def _load_model(torch: Any, args: argparse.Namespace) -> Any:
    if args.torchscript is not None:
        model = torch.jit.load(str(args.torchscript))
    else:
        module_name, _, attr = args.module.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        model = target()
    # Tracing records one forward pass: dropout or batch-norm updates would be baked in.
    return model.eval() if hasattr(model, "eval") else model


def config_lines(batch: int, dynamic: bool, max_batch: int) -> list[str]:
    def param(key: str, value: str) -> str:
        return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'

    if batch == 0:
        lines = ["max_batch_size: 0"]
    elif not dynamic:
        lines = [f"max_batch_size: {batch}", param(model_config.PARAM_BATCH_SIZES, str(batch))]
    else:
        top = max_batch or 4 * batch
        sizes = [*range(batch, top + 1, batch)]
        sizes += [top] if sizes[-1] != top else []
        lines = [f"max_batch_size: {top}", param(model_config.PARAM_NEURON_DYNAMIC_BATCH, "true"),
                 "# optional: batches of whole chunks, so no chunk is padded inside the model:",
                 "# " + param(model_config.PARAM_BATCH_SIZES, ",".join(map(str, sizes)))]
    return [*lines, param(model_config.PARAM_POOLS, "neuron")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        torch = importlib.import_module("torch")
        neuronx = importlib.import_module("torch_neuronx")
    except ImportError as exc:
        print(f"cannot import torch-neuronx ({exc}): {INSTALL_HINT}; compiling also needs neuronx-cc",
              file=sys.stderr)
        return 2
    model = _load_model(torch, args)
    batch = (args.batch_size,) if args.batch_size else ()
    examples = tuple(torch.zeros((*batch, *dims), dtype=getattr(torch, TORCH_DTYPES[dtype]))
                     for _, dtype, dims in args.input)
    options: dict[str, Any] = {}
    if args.compiler_args:
        options["compiler_args"] = shlex.split(args.compiler_args)
    if args.compiler_workdir:
        options["compiler_workdir"] = args.compiler_workdir
    traced = neuronx.trace(model, examples, **options)
    if args.dynamic_batch:
        traced = neuronx.dynamic_batch(traced)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(args.out / NEURON_MODEL_FILE))
    meta = {"batch_size": args.batch_size, "dynamic_batch": args.dynamic_batch,
            "inputs": [{"name": n, "datatype": d, "dims": list(s)} for n, d, s in args.input],
            "compiler_args": options.get("compiler_args", [])}
    (args.out / NEURON_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    print(f"wrote {args.out / NEURON_MODEL_FILE} and {args.out / NEURON_META_FILE}")
    print(f"add to {args.out.parent / 'config.pbtxt'}:")
    for line in config_lines(args.batch_size, args.dynamic_batch, args.max_batch_size):
        print("  " + line)
    if not (args.out / "model.onnx").is_file():
        print(f"note: Ferry reads tensor names, types and shapes from {args.out / 'model.onnx'}, which is "
              "missing: export the same model there with torch.onnx.export (batch dimension dynamic); "
              "see docs/neuron.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
