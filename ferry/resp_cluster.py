"""The data-path Redis client for Redis Cluster: ferry.resp per node, commands routed by slot.

Every Ferry key carries a hash tag (broker.keys), so every script and every
multi-key command touches one slot.  A pipeline is split by node, each part
sent over that node's connection at once, and the replies put back in order.
A MOVED or ASK reply (the cluster resharded or failed over) makes the client
re-read the slot map (CLUSTER SLOTS) and send those commands again, up to
``REDIRECTS`` times.

Keyless commands go to any node, except SCRIPT (every primary must know a
script before EVALSHA names it).  PUBLISH goes to any node: the cluster bus
delivers it to subscribers on all of them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import hiredis

from ferry.redis_url import RedisTarget
from ferry.redis_url import parse as parse_url
from ferry.resp import Command, DataClient, RespClient, RespError, raise_first_error

REDIRECTS = 3
SLOTS = 16384
Node = tuple[str, int]


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def slot(key: bytes | str) -> int:
    """Redis Cluster's slot of a key (CRC16/XMODEM of its hash tag, or of the whole key)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    crc = 0
    for b in raw:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc % SLOTS


def key_of(command: Command) -> bytes | str | None:
    """The key that decides where ``command`` runs (None: any node)."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) > 0 else None  # type: ignore[return-value]
    if name == "XREADGROUP":
        i = [str(a).upper() for a in command].index("STREAMS")
        return command[i + 1]  # type: ignore[return-value]
    if name in ("BLMPOP", "LMPOP"):
        return command[3]  # type: ignore[return-value]
    if name == "XINFO":
        return command[2]  # type: ignore[return-value]
    if name in ("SCRIPT", "INFO", "PING", "ROLE", "PUBLISH", "CLUSTER"):
        return None
    return command[1]  # type: ignore[return-value]


class ClusterClient:
    """Same surface as ferry.resp.RespClient: execute, send_now/confirm, call, close."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._target = parse_url(url)
        self._nodes: dict[Node, RespClient] = {}
        self._owner: list[Node] = []  # slot -> primary
        self._refreshing: asyncio.Lock | None = None
        self._maps = 0

    @property
    def connections(self) -> int:
        """Connections opened so far, on all nodes (see RespClient.connections)."""
        return self._maps + sum(n.connections for n in self._nodes.values())

    def _node(self, addr: Node) -> RespClient:
        client = self._nodes.get(addr)
        if client is None:
            client = self._nodes[addr] = RespClient(_node_url(self._target, addr), self.timeout_s)
        return client

    async def _refresh(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            seeds = list(dict.fromkeys([*{a for a in self._owner}, *self._target.sentinels]))
            problems = []
            for addr in seeds:
                try:
                    ranges = await self._node(addr).call("CLUSTER", "SLOTS")
                except (OSError, RespError) as exc:
                    problems.append(f"{addr[0]}:{addr[1]}: {exc}")
                    continue
                owner: list[Node] = [("", 0)] * SLOTS
                for first, last, primary, *_ in ranges:
                    node = (primary[0].decode() or addr[0], int(primary[1]))
                    owner[int(first) : int(last) + 1] = [node] * (int(last) - int(first) + 1)
                self._owner = owner
                self._maps += 1
                return
            raise ConnectionError(f"no cluster node answered CLUSTER SLOTS ({'; '.join(problems)})")

    def _route(self, command: Command) -> Node | None:
        key = key_of(command)
        return None if key is None else self._owner[slot(key)]

    async def execute(self, commands: Sequence[Command], *, timeout_s: float | None = None,
                      raise_errors: bool = True) -> list[Any]:
        if not self._owner:
            await self._refresh()
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(REDIRECTS + 1):
            by_node: dict[Node, list[int]] = defaultdict(list)
            broadcast: list[int] = []
            for i in todo:
                name = str(commands[i][0]).upper()
                if name == "SCRIPT":
                    broadcast.append(i)
                    continue
                node = self._route(commands[i]) or next(a for a in self._owner if a[0])
                by_node[node].append(i)
            parts = list(by_node.items())
            try:
                results = await asyncio.gather(*(
                    self._node(node).execute([commands[i] for i in idxs], timeout_s=timeout_s, raise_errors=False)
                    for node, idxs in parts
                ))
            except (OSError, TimeoutError):
                # A node is gone or unreachable: its slots may have moved to a promoted replica,
                # which the next call learns from CLUSTER SLOTS.
                self._owner = []
                raise
            for (_, idxs), got in zip(parts, results, strict=True):
                for i, reply in zip(idxs, got, strict=True):
                    replies[i] = reply
            for i in broadcast:
                every = await asyncio.gather(*(self._node(n).execute([commands[i]], timeout_s=timeout_s,
                                                                     raise_errors=False)
                                               for n in set(self._owner) if n[0]))
                replies[i] = every[0][0]
            todo = [i for i in todo if isinstance(replies[i], hiredis.ReplyError)
                    and str(replies[i]).startswith(("MOVED", "ASK"))]
            if not todo or attempt == REDIRECTS:
                break
            await self._refresh()
        if raise_errors:
            raise_first_error(replies)
        return replies

    def send_now(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]] | None:
        if not self._owner:
            return None
        return asyncio.ensure_future(self.execute(commands, raise_errors=False))

    async def confirm(self, sent: asyncio.Future[list[Any]], *, raise_errors: bool = True) -> list[Any]:
        async with asyncio.timeout(self.timeout_s):
            replies = await sent
        if raise_errors:
            raise_first_error(replies)
        return replies

    async def call(self, *args: bytes | str | int | float, timeout_s: float | None = None) -> Any:
        return (await self.execute([args], timeout_s=timeout_s))[0]

    def drop(self) -> None:
        for node in self._nodes.values():
            node.drop()
        self._owner = []

    async def close(self) -> None:
        for node in self._nodes.values():
            await node.close()


def _node_url(t: RedisTarget, addr: Node) -> str:
    auth = f"{t.username or ''}:{t.password}@" if t.password is not None else ""
    return f"redis://{auth}{addr[0]}:{addr[1]}/0"


def subscriber_urls(url: str) -> list[str]:
    """Where a subscriber may listen, to try in turn: the server, or any node of a cluster (the
    cluster bus delivers every PUBLISH to subscribers on all of them)."""
    t = parse_url(url)
    return [_node_url(t, addr) for addr in t.sentinels] if t.cluster else [url]


def data_client(url: str, timeout_s: float) -> DataClient:
    """The data-path client for ``url``: one connection, or one per cluster node."""
    return ClusterClient(url, timeout_s) if parse_url(url).cluster else RespClient(url, timeout_s)


def stream_groups(client: DataClient, streams: Sequence[bytes | str]) -> list[list[bytes | str]]:
    """Streams that one XREADGROUP may read together: all of them on one server, one slot's on a cluster."""
    if not isinstance(client, ClusterClient):
        return [list(streams)]
    by_slot: dict[int, list[bytes | str]] = defaultdict(list)
    for s in streams:
        by_slot[slot(s)].append(s)
    return list(by_slot.values())
