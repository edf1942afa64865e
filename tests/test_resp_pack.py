"""ferry.resp.pack_into, the data path's RESP encoder: byte for byte what hiredis's own packer makes,
and values of every size (around the inline limit, binary, large) round-trip through a real redis-server."""

from __future__ import annotations

import asyncio
import os

import hiredis
import pytest

from ferry import resp
from ferry.cluster import RedisServer
from ferry.resp import RespClient, pack_into

SIZES = (0, 1, resp._INLINE_MAX - 1, resp._INLINE_MAX, resp._INLINE_MAX + 1, 100_000)


def _packed(args: list[bytes | str | int]) -> bytes:
    out: list[bytes] = []
    pack_into(out, args)
    return b"".join(out)


@pytest.mark.parametrize("size", SIZES)
def test_same_bytes_as_hiredis(size: int) -> None:
    value = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    for args in (
        ["EVALSHA", "a" * 40, 2, "ferry:{m:mlp}:v1:requests", "k\u00e9y", -7, 10**20, value],
        ["EVALSHA", "a" * 40, 2, "ferry:{m:mlp}:v1:requests", "k\u00e9y", -7, 10**20, value],  # cached pieces
        [b"SET", "k", value, 0],
    ):
        assert _packed(args) == hiredis.pack_command(tuple(args))


def test_values_of_every_size_round_trip_through_redis(redis_server: RedisServer) -> None:
    async def run() -> None:
        r = RespClient(redis_server.url, 5.0)
        try:
            for size in SIZES:
                value = os.urandom(size)
                assert await r.execute([["SET", f"v{size}", value]]) == [b"OK"]
                assert await r.call("GET", f"v{size}") == value
                assert await r.call("STRLEN", f"v{size}") == len(value)
            await r.call("FLUSHALL")
        finally:
            await r.close()

    asyncio.run(run())
