"""The Grafana dashboard and the Prometheus alert rules that ship with Ferry name only metrics
Ferry exports (ferry/metrics.py), and the alerts the docs promise exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from ferry import metrics  # noqa: F401 (registers every metric)

FILES = Path(__file__).resolve().parent.parent / "helm" / "ferry" / "files"
NAME = re.compile(r"\bferry_[a-z_]+\b")


def exported() -> set[str]:
    """Every sample name the metrics can produce: counters' _total, histograms' _bucket/_sum/_count."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("ferry_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_every_exported_family_is_known_to_the_check() -> None:
    # Histograms and counters without children yet still describe themselves.
    assert {"ferry_requests_total", "ferry_request_duration_seconds_bucket", "ferry_live_workers"} <= exported()


def test_dashboard_queries_name_real_metrics() -> None:
    dash = json.loads((FILES / "ferry-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    unknown = {n for e in exprs for n in NAME.findall(e)} - exported()
    assert not unknown, unknown
    assert all(p["description"] for p in dash["panels"])


def test_alert_rules_name_real_metrics_and_cover_the_promised_cases() -> None:
    rules = yaml.safe_load((FILES / "ferry-alerts.yaml").read_text())["groups"][0]["rules"]
    unknown = {n for r in rules for n in NAME.findall(r["expr"])} - exported()
    assert not unknown, unknown
    names = {r["alert"] for r in rules}
    assert {"FerryPoolWithoutWorkers", "FerryQueueStalled", "FerryHighErrorRate", "FerryDeadlineMisses"} <= names
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r
