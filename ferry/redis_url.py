"""Where Redis is: the URL forms Ferry accepts, parsed in one place.

    redis://[[user]:password@]host[:port][/db]        plain TCP
    rediss://...[?ssl_ca_certs=CA.pem[&ssl_certfile=C.pem&ssl_keyfile=K.pem]]   TLS (the system's CAs by default)
    unix:///path/to/redis.sock[?db=N]                 Unix socket
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]
                                                      Redis Sentinel: the Sentinels are
                                                      asked for the current primary of
                                                      ``service`` at every (re)connect
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                      Redis Cluster: any of the nodes;
                                                      the rest is learned from CLUSTER
                                                      SLOTS (database 0 only)

With Sentinel, credentials in the URL are the primary's; the Sentinels are
contacted without them (Sentinel's own ``requirepass`` is not supported yet).
A primary that was demoted by a failover answers writes with READONLY: the
clients then drop the connection and ask the Sentinels again (ferry.resp, and
redis-py's SentinelConnectionPool).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from ferry.errors import ConfigError

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class RedisTarget:
    scheme: str  # redis, rediss, unix, redis+sentinel or redis+cluster
    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()  # Sentinels, or a cluster's seed nodes
    service: str = ""
    # rediss:// query parameters, named as redis-py names them (it reads the same URL):
    ssl_ca_certs: str = ""  # CA file to verify the server with (default: the system's store)
    ssl_certfile: str = ""  # client certificate, for a Redis with tls-auth-clients yes
    ssl_keyfile: str = ""

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for rediss:// (None for plaintext)."""
        if self.scheme != "rediss":
            return None
        context = ssl.create_default_context(cafile=self.ssl_ca_certs or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return context

    @property
    def sentinel(self) -> bool:
        return self.scheme == "redis+sentinel"

    @property
    def cluster(self) -> bool:
        return self.scheme == "redis+cluster"


def parse(url: str) -> RedisTarget:
    if not url.startswith(SCHEMES):
        raise ConfigError(f"redis_url {redact(url)!r} must start with one of {', '.join(SCHEMES)}")
    u = urlparse(url)
    user = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password is not None else None
    query = parse_qs(u.query)
    try:
        if u.scheme == "unix":
            return RedisTarget("unix", path=unquote(u.path), db=int(query.get("db", ["0"])[0]),
                               username=user, password=password)
        if u.scheme == "redis+sentinel":
            hosts = u.netloc.rsplit("@", 1)[-1]
            sentinels = tuple(_host_port(h, 26379) for h in hosts.split(",") if h)
            parts = [p for p in u.path.split("/") if p]
            if not sentinels or not parts:
                raise ValueError("redis+sentinel://host:port[,host:port...]/service[/db] names no Sentinel or service")
            return RedisTarget("redis+sentinel", db=int(parts[1]) if len(parts) > 1 else 0, username=user,
                               password=password, sentinels=sentinels, service=parts[0])
        if u.scheme == "redis+cluster":
            hosts = u.netloc.rsplit("@", 1)[-1]
            seeds = tuple(_host_port(h, 6379) for h in hosts.split(",") if h)
            if not seeds:
                raise ValueError("redis+cluster://host:port[,host:port...] names no node")
            if u.path.strip("/") not in ("", "0"):
                raise ValueError("Redis Cluster has database 0 only")
            return RedisTarget("redis+cluster", username=user, password=password, sentinels=seeds)
        db = u.path.strip("/")
        tls = {k: query[k][0] for k in TLS_PARAMS if k in query}
        if tls and u.scheme != "rediss":
            raise ValueError(f"{', '.join(tls)} apply to rediss:// only")
        for name, path in tls.items():
            if not Path(path).is_file():
                raise ValueError(f"{name} {path!r} is not a readable file")
        return RedisTarget(u.scheme, host=u.hostname or "127.0.0.1", port=u.port or 6379,
                           db=int(db or query.get("db", ["0"])[0]), username=user, password=password,
                           ssl_ca_certs=tls.get("ssl_ca_certs", ""), ssl_certfile=tls.get("ssl_certfile", ""),
                           ssl_keyfile=tls.get("ssl_keyfile", ""))
    except ValueError as exc:
        raise ConfigError(f"redis_url {redact(url)!r} is not valid: {exc}") from None


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return host or "127.0.0.1", int(port) if port else default_port


def redact(url: str) -> str:
    """The URL without credentials, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if sep else url.rsplit("@", 1)[-1]
