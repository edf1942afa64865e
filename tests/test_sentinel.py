"""ferry.resp through Redis Sentinel, against real redis-servers (a primary, its replica and one Sentinel).

After a planned failover (SENTINEL FAILOVER) the old primary stays a writable primary until a Sentinel
converts it into a replica, about 8 s after it first sees it report the wrong role; whatever it accepts
meanwhile is discarded when it resyncs.  A client whose connection predates the failover must move to
the new primary as soon as the Sentinels name it, not when the old one is converted: otherwise a
broker's acknowledgements are "confirmed" on a server that then forgets them, and a subscription stays
deaf to what is published on the new primary (both seen in the Sentinel chaos run).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from ferry.cluster import find_redis_server, free_port
from ferry.resp import RespClient, listen
from ferry.resp_sentinel import WATCH_S

# The Sentinels convert a demoted primary no sooner than this after they first see it (sentinel.c:
# SENTINEL_PUBLISH_PERIOD * 4); a client must have moved well before.
CONVERSION_S = 8.0
MOVE_BOUND_S = 3.0


@dataclass
class Sentinel:
    url: str
    port: int
    primaries: list[int]
    proc: subprocess.Popen[bytes]

    def named(self) -> int:
        return int(redis.Redis(port=self.port).execute_command("SENTINEL", "get-master-addr-by-name", "ferry")[1])


def _wait(what: str, ok: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server")
    primary, replica, port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> None:
        procs.append(subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))

    try:
        for p in (primary, replica):
            d = tmp_path / str(p)
            d.mkdir()
            start("--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d),
                  *(("--replicaof", "127.0.0.1", str(primary)) if p == replica else ()))
        _wait("the replica in sync", lambda: _in_sync(replica))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor ferry 127.0.0.1 {primary} 1\n"
                        "sentinel down-after-milliseconds ferry 1000\nsentinel failover-timeout ferry 5000\n")
        start(str(conf), "--sentinel")
        s = Sentinel(f"redis+sentinel://127.0.0.1:{port}/ferry/0", port, [primary, replica], procs[-1])
        _wait("the Sentinel knows the replica", lambda: _sentinel_sees_replica(port))
        yield s
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _in_sync(port: int) -> bool:
    try:
        return redis.Redis(port=port).info("replication").get("master_link_status") == "up"
    except redis.ConnectionError:
        return False


def _sentinel_sees_replica(port: int) -> bool:
    try:
        replicas = redis.Redis(port=port).sentinel_slaves("ferry")
    except redis.ConnectionError:
        return False
    return any(r.get("master-link-status") == "ok" and not r.get("is_sdown") for r in replicas)


async def _server_port(client: RespClient) -> int:
    info = (await client.call("INFO", "server")).decode()
    return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("tcp_port:")))


@pytest.mark.timeout(60)
def test_connections_follow_a_planned_failover_before_the_old_primary_is_converted(sentinel: Sentinel) -> None:
    async def run() -> None:
        client = RespClient(sentinel.url, 2.0)
        old = sentinel.primaries[0]
        assert await _server_port(client) == old
        heard: list[bytes] = []
        subscription = asyncio.create_task(
            listen(sentinel.url, 2.0, ["ch"], lambda _c, data: heard.append(data), ping_s=0.2))

        redis.Redis(port=sentinel.port).execute_command("SENTINEL", "FAILOVER", "ferry")
        await asyncio.to_thread(_wait, "the Sentinel names the replica", lambda: sentinel.named() != old)
        named = time.monotonic()
        new = sentinel.named()

        # The old primary is still a primary (nothing has converted it yet): a connection left on it
        # would go on writing there without an error.
        assert redis.Redis(port=old).info("replication")["role"] == "master"
        while True:
            try:
                if await _server_port(client) == new:
                    break
            except ConnectionError:
                pass  # the stale connection was dropped under this call: the next one reconnects
            assert time.monotonic() - named < MOVE_BOUND_S, "the client still talks to the demoted primary"
            await asyncio.sleep(0.05)
        await client.call("SET", "after-failover", "1")
        assert redis.Redis(port=new).get("after-failover") == b"1"

        # The subscription ended (the caller subscribes again); it did not stay on the old primary.
        done, _ = await asyncio.wait([subscription], timeout=MOVE_BOUND_S - (time.monotonic() - named))
        assert done, "the subscription stayed on the demoted primary"
        assert isinstance(subscription.exception(), ConnectionError | OSError | TimeoutError)
        assert time.monotonic() - named < CONVERSION_S
        await client.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_connections_stay_while_no_sentinel_answers(sentinel: Sentinel) -> None:
    """Following must not turn a Sentinel outage into a Redis outage: with no Sentinel to ask, the
    connections already open keep serving (a new one cannot be opened, as before)."""
    async def run() -> None:
        client = RespClient(sentinel.url, 2.0)
        await client.call("SET", "k", "1")
        sentinel.proc.kill()
        sentinel.proc.wait()
        deadline = time.monotonic() + 4 * WATCH_S + 1  # several questions go unanswered
        while time.monotonic() < deadline:
            assert await client.call("GET", "k") == b"1"
            await asyncio.sleep(0.05)
        assert client.connections == 1
        await client.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_a_reconnect_asks_the_sentinel_the_watch_followed(tmp_path: Path) -> None:
    """Sentinels can disagree for a moment in a failover.  When the one a process follows is not the
    first in its URL, a reconnect must ask that same Sentinel: asking the URL's first one put the
    connection back on the server the watch had just left, to be dropped again every WATCH_S.

    Two Sentinels that disagree for good: the first names server P, the second server Q.  While the
    first is stopped (SIGSTOP: it neither answers nor refuses), the watch hears Q from the second and
    drops the connection to P; once the first answers again, the next call must go to Q."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server")
    p, q, s1, s2 = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        return procs[-1]

    def named(port: int) -> bool:
        try:
            return redis.Redis(port=port).sentinel_get_master_addr_by_name("ferry") is not None
        except redis.ConnectionError:
            return False

    try:
        for port in (p, q):
            start("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--dir", str(tmp_path))
        first = None
        for sentinel, server in ((s1, p), (s2, q)):
            conf = tmp_path / f"sentinel-{sentinel}.conf"
            conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor ferry 127.0.0.1 {server} 1\n")
            proc = start(str(conf), "--sentinel")
            first = first or proc
            _wait(f"Sentinel {sentinel} up", lambda port=sentinel: named(port))
        assert first is not None

        async def run() -> None:
            client = RespClient(f"redis+sentinel://127.0.0.1:{s1},127.0.0.1:{s2}/ferry/0", 0.5)
            assert await _server_port(client) == p  # the URL's first Sentinel named P
            await client.call("CLIENT", "SETNAME", "under-test")
            on_p = redis.Redis(port=p)
            first.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 4 * WATCH_S + 2
                # No calls meanwhile: the reconnect must come after the first Sentinel answers again.
                while any(c["name"] == "under-test" for c in on_p.client_list()):
                    assert time.monotonic() < deadline, "the watch did not follow the second Sentinel"
                    await asyncio.sleep(0.05)
            finally:
                first.send_signal(signal.SIGCONT)
            # Both Sentinels answer again; the connection the calls now use, and those after, are Q's.
            end = time.monotonic() + 3 * WATCH_S
            while time.monotonic() < end:
                with contextlib.suppress(ConnectionError):
                    assert await _server_port(client) == q
                await asyncio.sleep(0.05)
            await client.close()

        asyncio.run(run())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
