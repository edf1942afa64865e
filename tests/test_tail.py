"""benchmarks/tail.py's analysis of a perf_analyzer export: a stall at one moment of a run shows up as
a hot stretch, and the p99 outside the hot stretches is the rest of the run's."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.tail import STRETCH_S, analyse


def export(tmp_path: Path, latency_ms: list[float]) -> Path:
    """One request sent every millisecond, answered after the given latency (perf_analyzer's layout)."""
    start = 1_700_000_000_000_000_000
    requests = [{"timestamp": start + i * 1_000_000,
                 "response_timestamps": [start + i * 1_000_000 + int(lat * 1e6)]}
                for i, lat in enumerate(latency_ms)]
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"experiments": [{"requests": requests}]}))
    return path


def test_a_stall_is_one_hot_stretch_and_the_rest_keeps_its_own_p99(tmp_path: Path) -> None:
    latency = [5.0] * 20_000  # 20 s, 80 stretches
    stalled = range(10_000, 10_250)  # the stretch that starts 10 s in
    for i in stalled:
        latency[i] = 20.0
    f = analyse(export(tmp_path, latency))
    assert f["p99"] == 20.0
    assert f["hot_share"] == 1.0  # every slow request was sent in the stalled stretch
    assert 10_000 * 0.001 // STRETCH_S * STRETCH_S in f["hot_at"]
    assert len(f["hot_at"]) == 80 // 20
    assert f["p99_outside_hot"] == 5.0


def test_slow_requests_spread_evenly_have_no_hot_stretch(tmp_path: Path) -> None:
    latency = [5.0] * 20_000
    for i in range(0, 20_000, 50):  # 2% of requests, one every 50 ms
        latency[i] = 20.0
    f = analyse(export(tmp_path, latency))
    # The busiest twentieth of the stretches holds about a twentieth of the slow requests.
    assert f["hot_share"] <= 0.1
    assert f["p99_outside_hot"] == 20.0
