"""broker.cpu_load: the idle share of the broker's CPUs, which gates return_wait_us."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from broker import cpu_load
from broker.cpu_load import BUSY_IDLE, STILL_BUSY_IDLE, CpuLoad


def _stat(path: Path, cpu0: tuple[int, ...], cpu1: tuple[int, ...]) -> None:
    # /proc/stat's layout: the aggregate line, then one per CPU (user nice system idle iowait irq
    # softirq steal guest guest_nice), then other counters that must be skipped.
    total = tuple(a + b for a, b in zip(cpu0, cpu1, strict=True))
    path.write_text(
        "cpu  " + " ".join(map(str, total)) + "\n"
        + "cpu0 " + " ".join(map(str, cpu0)) + "\n"
        + "cpu1 " + " ".join(map(str, cpu1)) + "\n"
        + "intr 12345 0 0\nctxt 999\nbtime 1700000000\n"
    )


def test_idle_share_counts_only_the_cpus_asked_for(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, (100, 0, 50, 1000, 10, 0, 5, 0, 0, 0), (100, 0, 50, 1000, 0, 0, 0, 0, 0, 0))
    one, both = CpuLoad([0], stat), CpuLoad([0, 1], stat)
    assert one.sample() is None and both.sample() is None  # nothing to compare with yet
    # cpu0: 97 busy + 2 idle + 1 iowait ticks; cpu1: 50 busy + 50 idle.
    _stat(stat, (190, 0, 57, 1002, 11, 0, 5, 0, 0, 0), (150, 0, 50, 1050, 0, 0, 0, 0, 0, 0))
    assert one.sample() == 3 / 100
    assert both.sample() == 53 / 200


def test_busy_only_when_idle_is_at_most_the_threshold(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    load = CpuLoad([0], stat)
    _stat(stat, (500, 0, 0, 500, 0, 0, 0, 0, 0, 0), (0,) * 10)
    assert not load.busy()  # first sample: unknown counts as not busy
    idle = int(100 * BUSY_IDLE)
    _stat(stat, (600 - idle, 0, 0, 500 + idle, 0, 0, 0, 0, 0, 0), (0,) * 10)
    assert load.busy()
    _stat(stat, (690 - idle, 0, 0, 510 + idle, 0, 0, 0, 0, 0, 0), (0,) * 10)
    assert not load.busy()  # 10% idle


def test_once_busy_a_little_more_idle_keeps_it_busy(tmp_path: Path) -> None:
    """Hysteresis: holding idles the core a little; only more than STILL_BUSY_IDLE ends it."""
    stat = tmp_path / "stat"
    load = CpuLoad([0], stat)
    _stat(stat, (500, 0, 0, 500, 0, 0, 0, 0, 0, 0), (0,) * 10)
    load.sample()
    between = int(100 * (BUSY_IDLE + STILL_BUSY_IDLE) / 2)  # 7% idle
    _stat(stat, (600 - between, 0, 0, 500 + between, 0, 0, 0, 0, 0, 0), (0,) * 10)
    assert load.busy(was_busy=True)
    _stat(stat, (700 - 2 * between, 0, 0, 500 + 2 * between, 0, 0, 0, 0, 0, 0), (0,) * 10)
    assert not load.busy(was_busy=False)
    over = int(100 * STILL_BUSY_IDLE) + 1
    _stat(stat, (800 - 2 * between - over, 0, 0, 500 + 2 * between + over, 0, 0, 0, 0, 0, 0), (0,) * 10)
    assert not load.busy(was_busy=True)


def test_unreadable_stat_never_counts_as_busy(tmp_path: Path) -> None:
    load = CpuLoad([0], tmp_path / "missing")
    assert load.sample() is None
    assert not load.busy() and not load.busy()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux only")
def test_the_real_proc_stat_reads() -> None:
    """The default (this process's affinity, /proc/stat) gives a share in [0, 1] once a tick passed."""
    load = CpuLoad()
    assert load.sample() is None
    deadline = time.monotonic() + 5
    share = None
    while share is None and time.monotonic() < deadline:
        sum(i * i for i in range(50_000))  # the kernel counts CPU time in ticks (1-10 ms)
        share = load.sample()
    assert share is not None and 0.0 <= share <= 1.0


class _ScriptedLoad(CpuLoad):
    """Stands in for /proc/stat: says busy or not as scripted, and records the gate it was given."""

    def __init__(self, script: list[bool]) -> None:
        super().__init__([0], "/nonexistent")
        self.script = script
        self.asked: list[bool] = []
        self.done = asyncio.Event()

    def busy(self, was_busy: bool = False) -> bool:
        self.asked.append(was_busy)
        if len(self.asked) == len(self.script):
            self.done.set()
        return self.script[min(len(self.asked), len(self.script)) - 1]


def test_watch_turns_holding_on_and_off_with_the_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the broker runs (broker.service applies it to every model and the gauge): off at
    first; on once a sample is saturated, off once one is not; the looser threshold while on."""
    monkeypatch.setattr(cpu_load, "SAMPLE_S", 0.0)
    load = _ScriptedLoad([False, True, True, False, True])
    applied: list[bool] = []

    async def main() -> None:
        task = asyncio.create_task(cpu_load.watch(load, applied.append))
        await load.done.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 10))
    assert load.asked == [False, False, True, True, False]  # whether it was on when it sampled
    assert applied == [True, False, True]
