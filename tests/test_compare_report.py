"""benchmarks/compare.py's report: a saved run becomes docs sections that a rerun replaces, never duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SAVED = ROOT / "benchmarks" / "results" / "compare-2026-11-26.json"


def _render(saved: Path, out: Path) -> str:
    proc = subprocess.run([sys.executable, "benchmarks/compare.py", "--from-json", str(saved), "--out", str(out),
                           "--no-plots"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def test_a_saved_run_renders_into_its_own_block_and_a_rerun_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nsweep's part\n\n<!-- notes below are kept by benchmarks/sweep.py -->\n\nnotes\n")
    first = _render(SAVED, out)
    saved = json.loads(SAVED.read_text())
    for mode, peers in saved["median"].items():
        assert f"### {mode}: inferences/s" in first
        triton_peak = max(r["throughput"] for r in peers["triton"])
        assert f"triton {triton_peak:,.0f}/s" in first
    assert first.index("sweep's part") < first.index("compare.py: begin") < first.index("notes\n")
    streaming = tmp_path / "streaming.json"
    streaming.write_text(json.dumps(saved | {"args": saved["args"] | {"streaming": "True"}}))
    both = _render(streaming, out)
    assert "ModelStreamInfer (perf_analyzer --streaming)" in both
    again = _render(SAVED, out)
    assert again == both  # replaced in place, not appended
    assert again.count("compare.py: begin") == 1 and again.count("compare.py --streaming: begin") == 1
