"""Structured logs: JSON lines with the request's id, model and status; nothing outside the
allowed fields reaches a line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

from ferry.lifecycle import _JsonFormatter, _TextFormatter
from tests.conftest import Cluster


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("ferry.gateway", logging.INFO, __file__, 1, "request answered", None, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_allowed_fields_only() -> None:
    line = json.loads(_JsonFormatter().format(_record(request_id="r-1", model="m", status="OK", payload=b"x" * 9)))
    assert line["msg"] == "request answered" and line["level"] == "INFO"
    assert (line["request_id"], line["model"], line["status"]) == ("r-1", "m", "OK")
    assert "payload" not in line


def test_text_lines_append_the_fields() -> None:
    text = _TextFormatter("%(message)s").format(_record(request_id="r-2", status="NOT_FOUND"))
    assert text == "request answered request_id=r-2 status=NOT_FOUND"


def test_gateway_logs_each_request_at_debug(repo: Path, tmp_path: Path) -> None:
    cluster = Cluster(repo, tmp_path, gateway_args=("--log-level", "DEBUG", "--log-json"))
    try:
        x = tc.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        cluster.client().infer("versioned", [x], model_version="1", request_id="find-me", client_timeout=20)
        cluster.stop()
        log = next(p for p in tmp_path.glob("gateway-*.log")).read_text()
        lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
        mine = [ln for ln in lines if ln.get("request_id") == "find-me"]
        assert len(mine) == 1, log[-2000:]
        assert (mine[0]["model"], mine[0]["version"], mine[0]["status"]) == ("versioned", 1, "OK")
        assert mine[0]["duration_ms"] > 0
    finally:
        cluster.close()
