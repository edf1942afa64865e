"""Process lifecycle shared by every component: event loop, logging, two-stage stop.

The first SIGTERM/SIGINT asks the component to drain (stop intake, finish
in-flight work, exit); a second one exits at once.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger("ferry")


# Structured fields a log call may pass with ``extra=``; they become keys of the JSON line (and
# key=value pairs in text).  A fixed list, so nothing else (a tensor, a token) can reach a log.
FIELDS = ("request_id", "model", "version", "status", "duration_ms", "trace_id")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        pairs = " ".join(f"{k}={record.__dict__[k]}" for k in FIELDS if k in record.__dict__)
        return f"{text} {pairs}" if pairs else text


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Wakeup:
    """Wakes one waiting task: ``set`` ends a ``wait`` at once, and a ``set`` before the ``wait``
    makes it return without waiting (until ``clear``).  Cheaper than ``wait_for(Event.wait())``,
    which creates a task per wait and takes several loop steps to resume the waiter; a loop that
    waits for every batch (the broker's dispatcher) pays that on its hot path."""

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout_s: float) -> None:
        """Until ``set`` or ``timeout_s`` seconds, whichever comes first."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], *, retry_s: float = 0.1, give_up_s: float = 5.0) -> None:
    """Cancel background tasks and wait until they are gone.

    One ``cancel()`` is not always enough: redis-py can turn a cancellation that
    lands inside a command into a connection error, which a retry loop then
    survives, and a plain ``gather`` would wait for it forever (seen: a broker and
    a worker that never stopped).  So cancel again until each task is done, and
    after ``give_up_s`` log what is left and leave it to process exit.
    """
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + give_up_s
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
        if pending and time.monotonic() > deadline:
            log.error("tasks %s did not stop when cancelled; leaving them", sorted(t.get_name() for t in pending))
            return


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def settle_heap() -> None:
    """Call once a process is ready to serve: collect the garbage start-up left, then take every
    object alive now (modules, protobuf descriptors, models, servers) out of later collections.

    Python's oldest-generation collection walks every tracked object. In the gateway under load
    (grpc.aio allocates a lot per call) that was about 8 collections in 16 seconds at 20-25 ms
    each, every call in flight waiting through them; frozen, the same collections took under
    0.5 ms (docs/architecture.md, "Garbage collection"). Reference counting still frees frozen
    objects; only a reference cycle among them would now stay, so start-up garbage is collected
    first. Safe to call again (a colocated broker and worker each call it)."""
    gc.collect()
    gc.freeze()


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on the fastest available loop; ``stop`` is set by the first signal."""

    # `kill -USR1 <pid>` prints every thread's stack to stderr, and `kill -USR2 <pid>`
    # every asyncio task's: how to see where a process that will not stop is stuck
    # (USR1 for a blocked loop, USR2 for a task awaiting something that never comes).
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("%s: draining (send again to exit at once)", sig.name)
                stop.set()
            else:
                log.warning("%s again: exiting now", sig.name)
                os._exit(128 + sig.value)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
        await main(stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(runner())
    else:
        uvloop.run(runner())
