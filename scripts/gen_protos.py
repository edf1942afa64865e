"""Regenerate the Python protobuf/gRPC code and mypy stubs in ``protos/``.

Usage::

    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale

Sources are ``protos/*.proto``; the repository root is the include path, so
the generated modules import each other as ``from protos import ...``.
Generated files are written next to their sources:

* ``<name>_pb2.py`` and ``<name>_pb2.pyi`` for every ``.proto`` file;
* ``<name>_pb2_grpc.py`` and ``<name>_pb2_grpc.pyi`` for files that declare
  a ``service``.

Any other ``*_pb2*.py``/``*_pb2*.pyi`` file in ``protos/`` is considered
stale and is deleted on regeneration.

The output depends only on the ``.proto`` files and on the installed
grpcio-tools and mypy-protobuf versions, so ``--check`` is only meaningful
with the project's pinned versions of those tools.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR_NAME = "protos"
PROTO_DIR = REPO_ROOT / PROTO_DIR_NAME

# Suffixes of every file this script owns inside PROTO_DIR.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_SERVICE_RE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)


def _find_plugin(name: str) -> Path:
    """Locate a protoc plugin installed next to the running interpreter."""
    # Deliberately not resolving symlinks: in a venv, sys.executable is a
    # symlink inside <venv>/bin, which is where the plugin scripts live.
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    sys.exit(
        f"error: protoc plugin {name!r} not found next to {sys.executable} or on PATH; "
        "install it with `pip install mypy-protobuf`."
    )


def _proto_sources() -> list[Path]:
    """Return the .proto files to compile, relative to REPO_ROOT, sorted."""
    sources = sorted(p.relative_to(REPO_ROOT) for p in PROTO_DIR.glob("*.proto"))
    if not sources:
        sys.exit(f"error: no .proto files found in {PROTO_DIR}")
    return sources


def _has_service(proto: Path) -> bool:
    text = (REPO_ROOT / proto).read_text(encoding="utf-8")
    # Strip // comments so a commented-out service does not count.
    text = re.sub(r"//[^\n]*", "", text)
    return _SERVICE_RE.search(text) is not None


def _run_protoc(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    # mypy-protobuf reports every file it writes on stderr; keep anything else
    # (protoc warnings, errors) visible.
    messages = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not line.startswith("Writing mypy to ")
    ]
    if messages:
        print("\n".join(messages), file=sys.stderr)
    if result.returncode != 0:
        sys.exit(f"error: protoc failed (exit {result.returncode}): {' '.join(cmd)}")


def generate(out_dir: Path) -> list[Path]:
    """Generate all code into ``out_dir``; return generated paths relative to it."""
    sources = _proto_sources()
    mypy_plugin = _find_plugin("protoc-gen-mypy")
    mypy_grpc_plugin = _find_plugin("protoc-gen-mypy_grpc")
    include = ["-I", "."]

    _run_protoc(
        [
            *include,
            f"--plugin=protoc-gen-mypy={mypy_plugin}",
            f"--python_out={out_dir}",
            f"--mypy_out={out_dir}",
            *(p.as_posix() for p in sources),
        ]
    )
    with_services = [p for p in sources if _has_service(p)]
    if with_services:
        _run_protoc(
            [
                *include,
                f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
                f"--grpc_python_out={out_dir}",
                f"--mypy_grpc_out={out_dir}",
                *(p.as_posix() for p in with_services),
            ]
        )

    generated = sorted(
        p.relative_to(out_dir)
        for p in (out_dir / PROTO_DIR_NAME).iterdir()
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )
    stray = sorted(
        p.relative_to(out_dir).as_posix()
        for p in out_dir.rglob("*")
        if p.is_file() and p.relative_to(out_dir) not in generated
    )
    if stray:
        sys.exit(f"error: protoc produced unexpected files: {', '.join(stray)}")
    return generated


def _committed_generated_files() -> list[Path]:
    return sorted(
        p.relative_to(REPO_ROOT)
        for p in PROTO_DIR.iterdir()
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def _tool_versions() -> str:
    versions = []
    for dist in ("grpcio-tools", "mypy-protobuf"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return ", ".join(versions)


def _stale_files(fresh_dir: Path, fresh: list[Path]) -> list[str]:
    """Describe every difference between fresh output and the repo's files."""
    problems: list[str] = []
    for rel in fresh:
        committed = REPO_ROOT / rel
        if not committed.is_file():
            problems.append(f"{rel.as_posix()} (missing)")
        elif not filecmp.cmp(fresh_dir / rel, committed, shallow=False):
            problems.append(f"{rel.as_posix()} (out of date)")
    fresh_set = set(fresh)
    for rel in _committed_generated_files():
        if rel not in fresh_set:
            problems.append(f"{rel.as_posix()} (no longer generated; delete it)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write anything; exit 1 if the generated code in protos/ is stale",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ferry-protos-") as tmp:
        out_dir = Path(tmp)
        fresh = generate(out_dir)

        if args.check:
            problems = _stale_files(out_dir, fresh)
            if problems:
                print(
                    "error: generated protobuf code is stale; "
                    "run `python scripts/gen_protos.py` and commit the result:",
                    file=sys.stderr,
                )
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                print(
                    f"(checked with {_tool_versions()}; generated code also changes "
                    "when these versions differ from the ones that produced the committed files)",
                    file=sys.stderr,
                )
                return 1
            print(f"protos: {len(fresh)} generated files are up to date")
            return 0

        fresh_set = set(fresh)
        for rel in _committed_generated_files():
            if rel not in fresh_set:
                (REPO_ROOT / rel).unlink()
                print(f"removed {rel.as_posix()}")
        for rel in fresh:
            target = REPO_ROOT / rel
            if target.is_file() and filecmp.cmp(out_dir / rel, target, shallow=False):
                continue
            shutil.copyfile(out_dir / rel, target)
            print(f"wrote {rel.as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
