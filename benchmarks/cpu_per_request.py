"""Where the CPU goes: CPU microseconds per request for each process, under perf_analyzer load.

    .venv/bin/python benchmarks/cpu_per_request.py --url 127.0.0.1:8001 --concurrency 32

Reads utime+stime from /proc for every Ferry component, redis-server and
perf_analyzer before and after a window in the middle of a perf_analyzer run,
and divides by the requests served.  On a shared machine this is steadier
than throughput: it does not depend on who else had the cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")

from benchmarks.sweep import perf_analyzer  # noqa: E402


def snapshot() -> dict[int, tuple[str, float]]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if m := re.search(r"ferry\.cli (gateway|broker|worker)", cmd):
            # A broker with its worker in process (`ferry up --edge` by default) counts as both.
            name = "broker+worker" if "--colocated-worker" in cmd else m.group(1)
        elif "ferry-edge" in cmd:
            name = "edge"
        elif "redis-server" in cmd:
            name = "redis-server"
        elif "perf_analyzer" in cmd and "-m" in cmd:
            name = "perf_analyzer"
        else:
            continue
        out[int(pid)] = (name, (int(stat[11]) + int(stat[12])) / TICK)
    return out


def measure(pa: str, url: str, model: str, concurrency: int, seconds: float) -> tuple[float, float, dict[str, float]]:
    """One perf_analyzer run: (inferences/s, p99 ms, CPU cores used per process role over a window
    in its middle)."""
    with tempfile.NamedTemporaryFile(suffix=".csv") as f:
        c = concurrency
        proc = subprocess.Popen([pa, "-m", model, "-u", url, "-i", "grpc", "--concurrency-range", f"{c}:{c}",
                                 "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage",
                                 "100", "--max-trials", "3", "-f", f.name], stdout=subprocess.DEVNULL)
        time.sleep(2)
        before, t0 = snapshot(), time.monotonic()
        time.sleep(seconds)
        after, dt = snapshot(), time.monotonic() - t0
        if proc.wait(300) != 0:
            raise RuntimeError("perf_analyzer failed")
        header, row = Path(f.name).read_text().splitlines()[:2]
    rec = dict(zip(header.split(","), row.split(","), strict=False))
    cores: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in before:
            cores[name] = cores.get(name, 0.0) + (cpu - before[pid][1]) / dt
    return float(rec["Inferences/Second"]), float(rec["p99 latency"]) / 1000, cores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    try:
        rate, _, per = measure(perf_analyzer(), args.url, args.model, args.concurrency, args.seconds)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"concurrency {args.concurrency}: {rate:.0f} inferences/s")
    print("| process | CPU (cores) | CPU µs per request |\n|---|---:|---:|")
    for name, cores in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {cores:.2f} | {cores * 1e6 / rate:.0f} |")
    total = sum(per.values())
    print(f"| total | {total:.2f} | {total * 1e6 / rate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
