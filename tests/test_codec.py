"""The worker's own reading of requests (workers.codec.decode) gives exactly what protobuf's parser
gives, on common requests and on thousands of truncated and corrupted ones.

The comparison runs in a child process (tests/support/codec_check.py): Ferry's protos cannot share
the pytest process with tritonclient (see conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_decode_agrees_with_protobuf() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "codec_check.py")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["mismatches"] == []
    # Both paths were exercised: the field walk answered the common requests (and the corruptions
    # it still reads as valid), protobuf's parser the rest.
    assert 100 < result["fast"] < result["cases"]
