"""Whether the CPUs this broker may run on are saturated: the gate on ``return_wait_us``.

Holding a small batch for the callers it just answered (scheduler ``return_wait_s``) trades a
little waiting for fewer model calls.  That pays only when the CPU is the bottleneck: where the
broker, its worker, the edge and Redis share saturated cores, the time the worker waits goes to
the return trip of the other requests, and every batch saved is CPU saved for requests.  With idle
CPU it buys nothing: the worker's core would sit idle while it waits (measured on 2 unpinned cores
at 8 and 16 concurrent callers: 8-12% fewer requests/s, docs/scheduling.md), and light open-loop
traffic would wait for callers who are not coming back.  So the broker starts holding once the
CPUs in its affinity mask were busy for all but ``BUSY_IDLE`` of the last sample, and stops once
they idled more than ``STILL_BUSY_IDLE``.

Read from ``/proc/stat`` (Linux).  It sees the host's CPUs, not a cgroup quota: a container
throttled by its CPU limit on an otherwise idle host counts as not busy (no holding, the
conservative side).  Where the file cannot be read, the CPUs never count as busy.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("ferry.broker")

# Saturated: at most this share of the sampled CPUs' time idle.  Pinned to one core, Ferry's core
# idled 0-3% from concurrency 1 up without holding; on two unpinned cores at 8-16 callers, 10-17%
# (2026-11-27, AMD EPYC VM).
BUSY_IDLE = 0.05
# Once holding, it stops only above this idle share: the holds themselves idle the core a little
# while callers on other CPUs send their next requests (4-6% of a second at 4 callers, pinned), and
# a gate flipping every second would hold in half of them.  More idle than this means the waits
# cost the core work.
STILL_BUSY_IDLE = 0.10
# How often the broker samples (seconds): long enough to smooth the kernel's tick accounting.
SAMPLE_S = 1.0


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


class CpuLoad:
    """Idle share of a set of CPUs between two calls to ``sample``."""

    def __init__(self, cpus: Iterable[int] | None = None, stat_path: str | Path = "/proc/stat") -> None:
        wanted = set(cpus) if cpus is not None else _affinity()
        self._names = {f"cpu{n}".encode() for n in wanted} if wanted is not None else None
        self._path = Path(stat_path)
        self._last: tuple[int, int] | None = None  # (idle ticks, all ticks) at the last sample

    def _read(self) -> tuple[int, int] | None:
        try:
            text = self._path.read_bytes()
        except OSError:
            return None
        idle = total = 0
        for line in text.splitlines():
            name, _, rest = line.partition(b" ")
            if not name.startswith(b"cpu") or name == b"cpu":
                continue
            if self._names is not None and name not in self._names:
                continue
            ticks = [int(x) for x in rest.split()]
            # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
            total += sum(ticks[:8])
            idle += ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return (idle, total) if total else None

    def sample(self) -> float | None:
        """Idle share since the previous call (None on the first call or when unreadable)."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return (now[0] - last[0]) / (now[1] - last[1])

    def busy(self, was_busy: bool = False) -> bool:
        """Sample, and say whether the CPUs were saturated since the previous sample (with
        ``was_busy``, the looser ``STILL_BUSY_IDLE`` applies)."""
        idle = self.sample()
        return idle is not None and idle <= (STILL_BUSY_IDLE if was_busy else BUSY_IDLE)


async def watch(load: CpuLoad, apply: Callable[[bool], None]) -> None:
    """Forever: every ``SAMPLE_S``, ``apply(True)`` once ``load`` is saturated, ``apply(False)`` once
    it no longer is (the looser threshold while on).  Starts off; the caller applies that first."""
    active = False
    while True:
        busy = load.busy(active)
        if busy != active:
            active = busy
            apply(active)
            log.debug("return_wait %s: the broker's CPUs are %s", "on" if active else "off",
                      "saturated" if active else "not saturated")
        await asyncio.sleep(SAMPLE_S)
