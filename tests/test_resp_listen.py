"""ferry.resp.listen, the broker's done-notice subscription, against a real redis-server: messages reach
the callback in order, and a connection that is closed or goes silent ends the subscription with an
error (so the broker subscribes again) instead of leaving it deaf."""

from __future__ import annotations

import asyncio
import os
import signal

from ferry.cluster import RedisServer
from ferry.resp import RespClient, listen


async def _subscribed(r: RespClient, channel: str) -> None:
    """Until the server counts a subscriber on ``channel``: the listener's SUBSCRIBE went through."""
    for _ in range(500):
        if (await r.call("PUBSUB", "NUMSUB", channel))[1]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nobody subscribed to {channel}")


def test_messages_reach_the_callback_in_order_and_a_killed_connection_ends_it(redis_server: RedisServer) -> None:
    got: list[tuple[bytes, bytes]] = []

    async def run() -> BaseException | None:
        r = RespClient(redis_server.url, 2.0)
        all_in = asyncio.Event()

        def on_message(channel: bytes, data: bytes) -> None:
            got.append((channel, data))
            if len(got) == 4:
                all_in.set()

        # PINGs every 10 ms interleave with the messages: each reply must still find its caller.
        task = asyncio.create_task(listen(redis_server.url, 1.0, ["ch:a", "ch:b"], on_message, ping_s=0.01))
        await asyncio.wait_for(_subscribed(r, "ch:b"), 5)
        await r.execute([("PUBLISH", "ch:a", "1"), ("PUBLISH", "ch:b", "2"), ("PUBLISH", "ch:c", "x"),
                         ("PUBLISH", "ch:a", "3")])
        await r.call("PUBLISH", "ch:b", "4")
        await asyncio.wait_for(all_in.wait(), 5)
        assert not task.done()
        await r.call("CLIENT", "KILL", "TYPE", "pubsub")
        try:
            await asyncio.wait_for(task, 5)
        except (ConnectionError, OSError) as exc:
            return exc
        finally:
            await r.close()
        return None

    error = asyncio.run(run())
    assert got == [(b"ch:a", b"1"), (b"ch:b", b"2"), (b"ch:a", b"3"), (b"ch:b", b"4")]
    assert error is not None, "a killed subscription must end with an error, so that its owner subscribes again"


def test_a_silent_connection_ends_within_ping_plus_timeout(redis_server: RedisServer) -> None:
    async def run() -> tuple[BaseException | None, float]:
        r = RespClient(redis_server.url, 2.0)
        task = asyncio.create_task(listen(redis_server.url, 0.3, ["ch:a"], lambda c, d: None, ping_s=0.05))
        await asyncio.wait_for(_subscribed(r, "ch:a"), 5)
        await r.close()
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # up, but answering nothing
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(task, 5)
        except (TimeoutError, ConnectionError, OSError) as exc:
            return exc, loop.time() - start
        return None, loop.time() - start

    error, took = asyncio.run(run())
    assert isinstance(error, TimeoutError), error
    assert took < 2.0
