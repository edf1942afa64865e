"""The Helm chart, rendered and linted offline with the embedded Helm 4 library (helm-python-sdk)
for several values files, every manifest validated against the Kubernetes schemas
(kubernetes-validate) and every KEDA ScaledObject against KEDA's (cloudcoil-models-keda).
No cluster exists here: nothing is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk comes with the dev extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parent.parent / "helm" / "ferry"
KUBE = "1.30.0"
VALUES = {"default": {}} | {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CHART / "ci").glob("*.yaml"))}
# Custom resources kubernetes-validate has no schema for; ScaledObjects are checked with KEDA's.
CRDS = {"ScaledObject", "PodMonitor", "PrometheusRule", "GRPCRoute"}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    out = helm.Chart.load(str(CHART)).render(values, name="ferry", namespace="inference")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text)]
    return [d for d in docs if d]


def kinds(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("case", list(VALUES))
def test_chart_lints_clean(case: str) -> None:
    report = helm.lint(str(CHART), VALUES[case], strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("case", list(VALUES))
def test_every_manifest_is_valid_kubernetes(case: str) -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    docs = render(VALUES[case])
    assert docs
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            ScaledObject.model_validate(doc)
        elif doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBE, strict=True)


def test_default_release_has_every_part_hardened() -> None:
    docs = render({})
    deployments = kinds(docs, "Deployment")
    assert set(deployments) == {"ferry-gateway", "ferry-broker", "ferry-worker-cpu"}
    assert "ferry-redis" in kinds(docs, "StatefulSet")
    assert set(kinds(docs, "PodDisruptionBudget")) == set(deployments)
    for d in deployments.values():
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["livenessProbe"] and c["readinessProbe"]
        assert pod["initContainers"][0]["args"] == ["example-model", "/models"]
    gateway = deployments["ferry-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"]["port"] == 8001
    scaled = kinds(docs, "ScaledObject")["ferry-worker-cpu"]["spec"]
    trigger, wake = scaled["triggers"]
    assert wake["type"] == "redis" and wake["metadata"]["listName"] == "ferry:{p:cpu}:wake"
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["stream"] == "ferry:{p:cpu}:batches"
    assert trigger["metadata"]["consumerGroup"] == "workers"
    assert trigger["metadata"]["address"] == "ferry-redis:6379"


def test_accelerator_pools_get_devices_placement_and_scale_to_zero() -> None:
    docs = render(VALUES["gpu-neuron-values"])
    deployments = kinds(docs, "Deployment")
    gpu = deployments["ferry-worker-gpu"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["containers"][0]["image"].endswith("/worker-gpu:0.1.0")
    assert gpu["runtimeClassName"] == "nvidia" and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    neuron = deployments["ferry-worker-neuron"]["spec"]["template"]["spec"]
    assert neuron["containers"][0]["resources"]["limits"]["aws.amazon.com/neuroncore"] == 2
    assert neuron["schedulerName"] == "my-scheduler"
    assert "--neuron-cores" in neuron["containers"][0]["args"]
    assert kinds(docs, "ScaledObject")["ferry-worker-gpu"]["spec"]["minReplicaCount"] == 0
    rule = kinds(docs, "PrometheusRule")["ferry"]
    assert {r["alert"] for r in rule["spec"]["groups"][0]["rules"]} >= {"FerryPoolWithoutWorkers"}
    assert "ferry-dashboard.json" in kinds(docs, "ConfigMap")["ferry-dashboard"]["data"]


def test_external_redis_comes_from_a_secret_and_nothing_is_bundled() -> None:
    docs = render(VALUES["external-redis-values"])
    assert not kinds(docs, "StatefulSet")
    env = kinds(docs, "Deployment")["ferry-broker"]["spec"]["template"]["spec"]["containers"][0]["env"]
    url = next(e for e in env if e["name"] == "FERRY_REDIS_URL")
    assert url["valueFrom"]["secretKeyRef"] == {"name": "ferry-redis", "key": "broker-url"}
    for obj in kinds(docs, "ScaledObject").values():
        assert all(t["authenticationRef"] == {"name": "ferry-redis-keda"} for t in obj["spec"]["triggers"])
    assert not kinds(docs, "NetworkPolicy")  # nothing bundled to protect
    volumes = kinds(docs, "Deployment")["ferry-gateway"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == "ferry-models"
    assert "ferry-gateway" in kinds(docs, "Ingress") and "ferry-gateway" in kinds(docs, "GRPCRoute")


def test_security_release_mounts_tls_and_tokens_and_fences_redis() -> None:
    docs = render(VALUES["security-values"])
    gw = kinds(docs, "Deployment")["ferry-gateway"]["spec"]["template"]["spec"]
    c = gw["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FERRY_TLS_CERT_FILE"] == "/etc/ferry/tls/tls.crt" and env["FERRY_TLS_CLIENT_CA_FILE"]
    assert env["FERRY_AUTH_TOKENS_FILE"] == "/etc/ferry/auth/tokens.json"
    assert {v["name"]: v["secret"]["secretName"] for v in gw["volumes"] if "secret" in v} == {
        "tls": "ferry-gateway-tls", "auth": "ferry-tokens"}
    # No subPath: Kubernetes then updates the files in place on rotation, which the gateway picks up.
    assert all("subPath" not in m for m in c["volumeMounts"])
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[:3] == ["ferry", "health", "--grpc"] and "--cert" in probe and "--ca" in probe
    policies = kinds(docs, "NetworkPolicy")
    redis_from = policies["ferry-redis"]["spec"]["ingress"][0]["from"]
    assert redis_from[0]["podSelector"]["matchLabels"]["ferry.dev/redis-client"] == "true"
    assert redis_from[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    # Every pod that talks to Redis carries the label the policy admits; nothing else does.
    clients = {name for name, d in kinds(docs, "Deployment").items()
               if d["spec"]["template"]["metadata"]["labels"].get("ferry.dev/redis-client") == "true"}
    assert clients == set(kinds(docs, "Deployment"))
    assert "ferry-gateway" in policies


def test_without_keda_pools_get_cpu_hpas() -> None:
    docs = render(VALUES["no-keda-values"])
    assert not kinds(docs, "ScaledObject")
    assert kinds(docs, "HorizontalPodAutoscaler")["ferry-worker-cpu"]["spec"]["maxReplicas"] == 10


@pytest.mark.parametrize("bad, says", [
    ({"pools": [{"name": "Bad Name", "runtime": "onnx-cpu"}]}, "pattern"),
    ({"pools": [{"name": "tpu", "runtime": "tpu"}]}, "runtime"),
    ({"gateway": {"replicas": 0}}, "replicas"),
    ({"redis": {"url": "http://nope"}}, "url"),
    ({"gatway": {}}, "gatway"),
])
def test_values_schema_rejects_mistakes(bad: dict[str, Any], says: str) -> None:
    report = helm.lint(str(CHART), bad)
    text = " ".join([m["error"] for m in report["messages"] if m["severity"] == 3] + report["errors"])
    assert says in text, report


def test_the_edge_serves_the_grpc_port_beside_its_gateway() -> None:
    docs = render(VALUES["edge-values"])
    pod = kinds(docs, "Deployment")["ferry-gateway"]["spec"]["template"]["spec"]
    gateway, edge = pod["containers"]
    assert edge["name"] == "edge" and edge["command"] == ["ferry-edge"]
    assert edge["args"][:4] == ["--listen", "0.0.0.0:8001", "--upstream", "127.0.0.1:8011"]
    assert edge["args"][-2:] == ["--procs", "1"]  # Go would size itself by the node's CPUs, not the limit
    # The Service's named port now lands on the edge; the gateway listens on its own port behind it.
    assert {p["name"]: p["containerPort"] for p in edge["ports"]}["grpc"] == 8001
    assert "grpc" not in {p["name"] for p in gateway["ports"]}
    assert gateway["args"][:3] == ["gateway", "--grpc-port", "8011"]
    assert gateway["readinessProbe"]["grpc"] == {"port": 8011} and edge["readinessProbe"]["grpc"] == {"port": 8001}
    assert any(e["name"] == "FERRY_REDIS_URL" for e in edge["env"])
    endpoints = kinds(docs, "PodMonitor")["ferry"]["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["metrics", "edge-metrics"]


def test_the_edge_refuses_tls() -> None:
    with pytest.raises(Exception, match="plaintext only"):
        render({"gateway": {"edge": {"enabled": True}, "tls": {"secretName": "t"}}})
