"""Deployment files, checked with the real tools offline: hadolint for the Dockerfiles, the
Compose v2 binary (`config -q`, no engine needed) and the compose-spec JSON schema for
docker-compose.yml. No image is built and nothing is run: no Docker engine exists here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with the dev extra)")
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/Dockerfile.neuron"])
def test_dockerfiles_are_hadolint_clean(dockerfile: str) -> None:
    proc = subprocess.run([_tool("hadolint"), dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("profiles", [(), ("gpu",), ("neuron",), ("observability",), ("edge",)])
def test_compose_file_is_valid_for_every_profile(profiles: tuple[str, ...]) -> None:
    args = [a for p in profiles for a in ("--profile", p)]
    proc = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", *args, "config", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_compose_spec_schema() -> None:
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services_run_ferry_as_built() -> None:
    proc = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", "--profile", "gpu", "config",
                           "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    import json

    services = json.loads(proc.stdout)["services"]
    for name in ("broker", "gateway", "worker-cpu", "worker-gpu"):
        svc = services[name]
        assert svc["environment"]["FERRY_REDIS_URL"] == "redis://redis:6379/0", name
        assert svc["read_only"] is True, name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--appendonly" in services["redis"]["command"]


def test_compose_edge_fronts_the_gateway_from_its_image() -> None:
    proc = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", "--profile", "edge", "config",
                           "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    import json

    edge = json.loads(proc.stdout)["services"]["edge"]
    assert edge["image"] == "ferry/gateway:dev" and edge["entrypoint"] == ["ferry-edge"]
    assert edge["command"][edge["command"].index("--upstream") + 1] == "gateway:8001"
    assert edge["environment"]["FERRY_REDIS_URL"] == "redis://redis:6379/0"


def test_health_command_says_what_is_wrong() -> None:
    from ferry.cli import main

    assert main(["health", "--http", "127.0.0.1:1"]) == 1
    assert main(["health"]) == 2  # neither --grpc nor --http: a usage error
