"""Model repository and settings errors fail at load, naming the file and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import unbatched_model, versioned_model

ROOT = Path(__file__).resolve().parent.parent

# Loading runs in a subprocess: ferry.model_config imports Ferry's protos, which
# cannot share the pytest process with tritonclient (see conftest).
LOADER = """
import json, sys
from pathlib import Path
from ferry.errors import ConfigError
from ferry.repository import load_repository
out = {}
for p in sys.argv[1:]:
    try:
        repo = load_repository(Path(p))
        out[p] = "OK " + ",".join(f"{mv.name}:{mv.version}" for mv in repo.all_versions())
    except ConfigError as exc:
        out[p] = exc.message
print(json.dumps(out))
"""


def _load(paths: list[Path]) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", LOADER, *map(str, paths)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return {Path(k).name: v for k, v in json.loads(proc.stdout).items()}


def _versioned(root: Path, config: str) -> Path:
    versioned_model(root)
    (root / "versioned" / "config.pbtxt").write_text(config)
    return root


CASES = {
    "ok": ('name: "versioned"\nmax_batch_size: 4\nversion_policy: { latest: { num_versions: 1 } }\n', "OK versioned:2"),
    "syntax": ('name: "versioned"\nmax_batch_size: [\n', "config.pbtxt: 2:17"),
    "unsupported": ('name: "versioned"\nmax_batch_size: 4\nsequence_batching {}\n', "sequence_batching: not supported"),
    "dims": ('max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_FP32 dims: [ 3 ] }]\n', "input[0].dims"),
    "dtype": ('max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_INT32 dims: [ 2 ] }]\n', "input[0].data_type"),
    "tensor": ('max_batch_size: 4\noutput [{ name: "z" data_type: TYPE_FP32 dims: [ 2 ] }]\n', "output[0]: 'z'"),
    "name": ('name: "other"\nmax_batch_size: 4\n', "name: 'other' must match"),
    "param": ('max_batch_size: 4\nparameters { key: "foo" value { string_value: "1" } }\n', "parameters['foo']"),
    "version": ('max_batch_size: 4\nversion_policy { specific { versions: [7] } }\n', "versions [7]"),
    "delay": ('max_batch_size: 0\ndynamic_batching { }\n', "dynamic_batching: requires max_batch_size"),
    "kind": ('max_batch_size: 4\ninstance_group [{ kind: KIND_GPU }]\n', "instance_group[0].kind"),
    "count": ('max_batch_size: 4\ninstance_group [{ kind: KIND_CPU count: 2 }]\n', "scale with more workers"),
}


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    roots = []
    for case, (config, _) in CASES.items():
        roots.append(_versioned(tmp_path / case, config))
    fixed = tmp_path / "fixed-batch"
    unbatched_model(fixed)
    (fixed / "unbatched" / "config.pbtxt").write_text("max_batch_size: 4\n")
    empty = tmp_path / "empty"
    (empty / "m").mkdir(parents=True)
    (empty / "m" / "config.pbtxt").write_text("max_batch_size: 0\n")
    results = _load([*roots, fixed, empty])
    for case, (_, needle) in CASES.items():
        msg = results[case]
        assert needle in msg, f"{case}: {msg}"
        if not msg.startswith("OK"):
            assert "config.pbtxt" in msg or "versioned" in msg, msg
    assert "max_batch_size" in results["fixed-batch"] and "first dimension must be dynamic" in results["fixed-batch"]
    assert "no version directory" in results["empty"]


def test_cli_reports_config_errors_and_unknown_settings(tmp_path: Path) -> None:
    bad = _versioned(tmp_path / "bad", CASES["unsupported"][0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    proc = subprocess.run([sys.executable, "-m", "ferry.cli", "broker", "--model-repository", str(bad)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert "sequence_batching: not supported" in proc.stderr and "config.pbtxt" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ferry.cli", "broker"], capture_output=True, text=True,
                          timeout=60, env={**env, "FERRY_GRPC_PROT": "1"}, cwd=ROOT)
    assert proc.returncode == 2 and "FERRY_GRPC_PROT" in proc.stderr


@pytest.mark.parametrize(("flags", "needle"), [
    ({"grpc_port": "70000"}, "grpc_port"),
    ({"redis_url": "http://x"}, "redis_url"),
    ({"request_timeout_s": "soon"}, "request_timeout_s"),
])
def test_settings_are_validated(flags: dict[str, str], needle: str) -> None:
    from ferry import settings as cfg
    from ferry.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        cfg.build(cfg.GatewaySettings, flags, env={})


def test_settings_precedence() -> None:
    from ferry import settings as cfg

    s = cfg.build(cfg.GatewaySettings, {"grpc_port": None}, env={"FERRY_GRPC_PORT": "9001", "REDIS_URL": "redis://h:1"})
    assert s.grpc_port == 9001 and s.redis_url == "redis://h:1"
    s = cfg.build(cfg.GatewaySettings, {"grpc_port": "9002"}, env={"FERRY_GRPC_PORT": "9001"})
    assert s.grpc_port == 9002
    with pytest.raises(Exception, match=r"frozen|cannot assign"):
        s.grpc_port = 1  # type: ignore[misc]


def test_configuration_docs_are_current() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
