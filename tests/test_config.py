"""Model repository and settings errors fail at load, naming the file and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import fragile_model, unbatched_model, versioned_model

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

# Same, but reports the scheduling settings of the newest version of the repository's one model.
SCHEDULING_LOADER = """
import dataclasses, json, sys
from pathlib import Path
from ferry.errors import ConfigError
from ferry.model_config import DEFAULT_MAX_QUEUE_SIZE
from ferry.repository import load_repository
out = {"DEFAULT_MAX_QUEUE_SIZE": DEFAULT_MAX_QUEUE_SIZE}
for p in sys.argv[1:]:
    try:
        s = load_repository(Path(p)).all_versions()[-1].settings
    except ConfigError as exc:
        out[p] = exc.message
        continue
    out[p] = {"priority_levels": s.priority_levels, "default_priority_level": s.default_priority_level,
              "queue_policy": dataclasses.asdict(s.queue_policy), "static_batch_sizes": s.static_batch_sizes,
              "shape_buckets": s.shape_buckets}
print(json.dumps(out))
"""


def _load(paths: list[Path], script: str = LOADER) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True,
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
    "kind": ('max_batch_size: 4\ninstance_group [{ kind: KIND_MODEL }]\n', "instance_group[0].kind"),
    "pools": ('max_batch_size: 4\nparameters { key: "ferry.pools" value { string_value: "cpu=x" } }\n',
              "cost 'x' is not a number"),
    "pools-twice": ('max_batch_size: 4\nparameters { key: "ferry.pools" value { string_value: "cpu,cpu=2" } }\n',
                    "listed twice"),
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


def _fragile(root: Path, config: str) -> Path:
    """Model 'fragile': input x is FP32 [batch, -1], so it has a variable dim to bucket."""
    fragile_model(root)
    (root / "fragile" / "config.pbtxt").write_text(config)
    return root


def _params(**values: str) -> str:
    return "".join(f'parameters {{ key: "ferry.{k}" value {{ string_value: "{v}" }} }}\n' for k, v in values.items())


DEFAULT_POLICY = {"timeout_action": "REJECT", "default_timeout_us": 0, "allow_timeout_override": False,
                  "max_queue_size": 4096}
# case -> (model, config, expected settings); only the fields that differ from the defaults are listed.
SCHEDULING_OK = {
    "defaults": (_versioned, "max_batch_size: 4\n", {}),
    "empty-batching": (_versioned, "max_batch_size: 4\ndynamic_batching { }\n", {}),
    "priorities": (_versioned, "max_batch_size: 4\ndynamic_batching { priority_levels: 3 default_priority_level: 3 }\n",
                   {"priority_levels": 3, "default_priority_level": 3}),
    "highest-default": (_versioned, "max_batch_size: 4\ndynamic_batching { priority_levels: 2 "
                        "default_priority_level: 1 }\n", {"priority_levels": 2, "default_priority_level": 1}),
    "policy": (_versioned, "max_batch_size: 4\ndynamic_batching { default_queue_policy { timeout_action: DELAY "
               "default_timeout_microseconds: 5000 allow_timeout_override: true max_queue_size: 16 } }\n",
               {"queue_policy": {"timeout_action": "DELAY", "default_timeout_us": 5000,
                                 "allow_timeout_override": True, "max_queue_size": 16}}),
    # Triton's max_queue_size 0 is "unbounded"; Ferry substitutes its default bound.
    "policy-unbounded": (_versioned, "max_batch_size: 4\ndynamic_batching { default_queue_policy { "
                         "timeout_action: REJECT default_timeout_microseconds: 100 max_queue_size: 0 } }\n",
                         {"queue_policy": {**DEFAULT_POLICY, "default_timeout_us": 100}}),
    "batch-sizes": (_versioned, "max_batch_size: 4\n" + _params(batch_sizes=" 4, 1,2,2"),
                    {"static_batch_sizes": [1, 2, 4]}),
    "buckets": (_fragile, "max_batch_size: 8\n" + _params(shape_buckets="x = 64,16, 32,16"),
                {"shape_buckets": [["x", [16, 32, 64]]]}),
    # Unbatched: dims include the leading -1 of versioned's x, so it can be bucketed.
    "buckets-unbatched": (_versioned, "max_batch_size: 0\n" + _params(shape_buckets="x=8,2"),
                          {"shape_buckets": [["x", [2, 8]]]}),
    "everything": (_fragile, "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [4] priority_levels: 2 "
                   "default_priority_level: 2 default_queue_policy { allow_timeout_override: true } }\n"
                   + _params(batch_sizes="1,4,8", shape_buckets="x=16,32"),
                   {"priority_levels": 2, "default_priority_level": 2,
                    "queue_policy": {**DEFAULT_POLICY, "allow_timeout_override": True},
                    "static_batch_sizes": [1, 4, 8], "shape_buckets": [["x", [16, 32]]]}),
}

B4 = "max_batch_size: 4\n"
# case -> (model, config, the text the error must contain: the field, then why / how to fix).
SCHEDULING_ERRORS = {
    "per-level-policy": (_versioned, B4 + "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
                         "priority_queue_policy { key: 1 value { max_queue_size: 4 } } }\n",
                         "dynamic_batching.priority_queue_policy: per-level queue policies are not supported; "
                         "use default_queue_policy"),
    "ordering": (_versioned, B4 + "dynamic_batching { preserve_ordering: true }\n",
                 "dynamic_batching.preserve_ordering: not supported; "),
    "level-without-levels": (_versioned, B4 + "dynamic_batching { default_priority_level: 1 }\n",
                             "dynamic_batching.default_priority_level: 1 but priority_levels is 0"),
    "level-missing": (_versioned, B4 + "dynamic_batching { priority_levels: 2 }\n",
                      "dynamic_batching.default_priority_level: 0 must be between 1 and priority_levels (2)"),
    "level-too-low": (_versioned, B4 + "dynamic_batching { priority_levels: 3 default_priority_level: 4 }\n",
                      "dynamic_batching.default_priority_level: 4 must be between 1 and priority_levels (3)"),
    "action": (_versioned, B4 + "dynamic_batching { default_queue_policy { timeout_action: 7 } }\n",
               "dynamic_batching.default_queue_policy.timeout_action: 7 is not a timeout action; use REJECT or DELAY"),
    "action-name": (_versioned, B4 + "dynamic_batching { default_queue_policy { timeout_action: DROP } }\n",
                    "TimeoutAction\" has no value named DROP"),
    "queue-size": (_versioned, B4 + "dynamic_batching {\n  default_queue_policy {\n    max_queue_size: -1\n  }\n}\n",
                   "'    max_queue_size: -1': Value out of range: -1 (this field is unsigned: use 0 or more)"),
    "levels-negative": (_versioned, B4 + "dynamic_batching {\n  priority_levels: -2\n}\n",
                        "'  priority_levels: -2': Value out of range: -2 (this field is unsigned"),
    "sizes-unbatched": (_versioned, "max_batch_size: 0\n" + _params(batch_sizes="1"),
                        "parameters['ferry.batch_sizes']: requires max_batch_size > 0"),
    "sizes-too-big": (_versioned, B4 + _params(batch_sizes="1,8"),
                      "parameters['ferry.batch_sizes']: 8 is larger than max_batch_size (4)"),
    "sizes-short": (_versioned, B4 + _params(batch_sizes="1,2"),
                    "parameters['ferry.batch_sizes']: largest size 2 must equal max_batch_size (4)"),
    "sizes-zero": (_versioned, B4 + _params(batch_sizes="0,4"),
                   "parameters['ferry.batch_sizes']: '0' is not a positive integer"),
    "sizes-float": (_versioned, B4 + _params(batch_sizes="1,2.5,4"),
                    "parameters['ferry.batch_sizes']: '2.5' is not a positive integer"),
    "sizes-gap": (_versioned, B4 + _params(batch_sizes="1,,4"),
                  "parameters['ferry.batch_sizes']: '' is not a positive integer"),
    "sizes-empty": (_versioned, B4 + _params(batch_sizes=" "),
                    "parameters['ferry.batch_sizes']: no sizes"),
    "buckets-input": (_fragile, "max_batch_size: 8\n" + _params(shape_buckets="y=16"),
                      "parameters['ferry.shape_buckets']: 'y' is not an input of the model (inputs: x)"),
    "buckets-fixed": (_versioned, B4 + _params(shape_buckets="x=16"),
                      "parameters['ferry.shape_buckets']: input 'x' has fixed dims [2]"),
    "buckets-size": (_fragile, "max_batch_size: 8\n" + _params(shape_buckets="x=16,-2"),
                     "parameters['ferry.shape_buckets']: input 'x': '-2' is not a positive integer"),
    "buckets-empty": (_fragile, "max_batch_size: 8\n" + _params(shape_buckets="x="),
                      "parameters['ferry.shape_buckets']: input 'x': no sizes"),
    "buckets-syntax": (_fragile, "max_batch_size: 8\n" + _params(shape_buckets="x:16"),
                       "parameters['ferry.shape_buckets']: 'x:16' is not input=size,size,..."),
    "buckets-twice": (_fragile, "max_batch_size: 8\n" + _params(shape_buckets="x=16;x=32"),
                      "parameters['ferry.shape_buckets']: input 'x' is listed twice"),
    "known-params": (_versioned, B4 + _params(batch_size="4"),
                     "ferry.batch_sizes: batch sizes a compiled model accepts"),
}


def test_scheduling_fields_are_exposed(tmp_path: Path) -> None:
    roots = [model(tmp_path / case, config) for case, (model, config, _) in SCHEDULING_OK.items()]
    results = _load(roots, SCHEDULING_LOADER)
    assert results["DEFAULT_MAX_QUEUE_SIZE"] == 4096
    defaults = {"priority_levels": 0, "default_priority_level": 0, "queue_policy": DEFAULT_POLICY,
                "static_batch_sizes": [], "shape_buckets": []}
    for case, (_, _, expected) in SCHEDULING_OK.items():
        assert results[case] == {**defaults, **expected}, case


def test_scheduling_errors_name_file_and_field(tmp_path: Path) -> None:
    roots = [model(tmp_path / case, config) for case, (model, config, _) in SCHEDULING_ERRORS.items()]
    results = _load(roots, SCHEDULING_LOADER)
    for case, (_, _, needle) in SCHEDULING_ERRORS.items():
        msg = results[case]
        assert isinstance(msg, str) and needle in msg, f"{case}: {msg}"
        assert msg.startswith(str(tmp_path / case)) and "config.pbtxt: " in msg, msg


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
    ({"flush_interval_edge_us": "-1"}, "flush_interval_edge_us"),
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


def test_ferry_up_starts_a_gateway_per_four_cpus() -> None:
    code = "from ferry.cluster import default_gateways; print([default_gateways(c) for c in (1, 2, 7, 8, 16, 64)])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[1, 1, 1, 2, 4, 8]"


def test_ferry_up_gathers_batches_when_every_process_shares_one_cpu() -> None:
    code = """
import json
from ferry.cluster import one_core_batching
print(json.dumps([one_core_batching({}, cpus=1), one_core_batching({}, cpus=2),
                  one_core_batching({"FERRY_JUST_IN_TIME": "true"}, cpus=1)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(proc.stdout) == [{"FERRY_JUST_IN_TIME": "false"}, {}, {}]
    assert "one CPU for every process" in proc.stderr


def test_ferry_up_behind_the_edge_batches_when_the_worker_is_free() -> None:
    code = """
import json
from ferry.cluster import edge_batching
print(json.dumps([edge_batching({}), edge_batching({"FERRY_POOL_DEPTH": "3"}),
                  edge_batching({"FERRY_GATHER_US": "500", "FERRY_POOL_DEPTH": "2"})]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(proc.stdout) == [{"FERRY_GATHER_US": "0", "FERRY_POOL_DEPTH": "1"}, {"FERRY_GATHER_US": "0"}, {}]
    assert "a batch leaves when the worker is free" in proc.stderr


def test_ferry_up_runs_the_first_worker_in_the_broker_process_behind_the_edge() -> None:
    code = """
import json
from ferry.cluster import colocation
print(json.dumps([colocation(None, 1, True, 2), colocation(None, 1, False, 2), colocation(False, 1, True, 1),
                  colocation(True, 2, False, 16), colocation(None, 0, True, 2), colocation(None, 1, True, 4)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(proc.stdout) == [True, False, False, True, False, False]
    assert proc.stderr.count("the broker process also runs the first worker") == 2


def test_ferry_up_runs_its_processes_under_sched_batch_where_they_share_cores() -> None:
    # Each case in a process of its own: the policy is the calling process's, and its children's.
    code = """
import json, os, subprocess, sys
from ferry.cluster import batch_scheduling
out = [batch_scheduling(None, 4), os.sched_getscheduler(0) == os.SCHED_OTHER,
       batch_scheduling(False, 1), os.sched_getscheduler(0) == os.SCHED_OTHER,
       batch_scheduling(None, 2), os.sched_getscheduler(0) == os.SCHED_BATCH]
child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                       capture_output=True, text=True, check=True)
out.append(int(child.stdout) == os.SCHED_BATCH)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(proc.stdout) == [False, True, False, True, True, True, True]
    assert proc.stderr.count("they run under SCHED_BATCH") == 1
    # Asked for on a big host, it is set without a note.
    code = "import os; from ferry.cluster import batch_scheduling; print(batch_scheduling(True, 16), " \
           "os.sched_getscheduler(0) == os.SCHED_BATCH)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert (proc.stdout.split(), proc.stderr) == (["True", "True"], "")


def test_a_colocated_worker_takes_its_own_knobs_from_the_environment_and_the_shared_ones_from_the_broker(
        tmp_path: Path) -> None:
    code = """
from pathlib import Path
from ferry import settings as cfg
from ferry.cli import _colocated_worker_settings
broker = cfg.build(cfg.BrokerSettings, {"redis_url": "redis://10.0.0.1:7000/2", "log_level": "DEBUG"})
w = _colocated_worker_settings(broker)
print(w.redis_url, w.log_level, w.pool, w.coalesce, w.model_repository)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env |= {"FERRY_POOL": "gpu", "FERRY_COALESCE": "3", "FERRY_MODEL_REPOSITORY": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["redis://10.0.0.1:7000/2", "DEBUG", "gpu", "3", str(tmp_path)]


def test_the_edge_and_the_python_processes_know_the_same_edge_settings() -> None:
    """ferry/settings.py lists the edge's variables so that one environment serves every process; the
    edge (gateway/edge/main.go, edgeEnv) refuses any FERRY_EDGE_ name it does not read. The two lists
    must agree, or a setting one side accepts stops the other at start."""
    import re

    from ferry.settings import EDGE_ENV_NAMES, LAUNCHER_ENV_NAMES

    source = (ROOT / "gateway" / "edge" / "main.go").read_text()
    block = re.search(r"var edgeEnv = map\[string\]bool\{(.*?)\}", source, re.S)
    assert block is not None, "edgeEnv not found in gateway/edge/main.go"
    go_names = set(re.findall(r'"(FERRY_[A-Z_]+)": true', block.group(1)))
    assert go_names == set(EDGE_ENV_NAMES) | set(LAUNCHER_ENV_NAMES)
