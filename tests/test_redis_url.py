"""The Redis URL forms Ferry accepts (ferry.redis_url), and the errors for the ones it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.redis_url import parse, redact
from ferry.resp_cluster import key_of, slot


def test_plain_tls_and_unix_urls() -> None:
    t = parse("redis://user:s3cret@db.example:6380/2")
    assert (t.scheme, t.host, t.port, t.db) == ("redis", "db.example", 6380, 2)
    assert (t.username, t.password) == ("user", "s3cret")
    assert parse("rediss://db.example").port == 6379
    u = parse("unix:///run/redis.sock?db=3")
    assert (u.path, u.db) == ("/run/redis.sock", 3)


def test_sentinel_url_names_every_sentinel_the_service_and_the_db() -> None:
    t = parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2,10.0.0.3:26380/mymaster/4")
    assert t.sentinel
    assert t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (t.service, t.db, t.password) == ("mymaster", 4, "pw")


@pytest.mark.parametrize("url, says", [
    ("http://localhost:6379", "must start with one of"),
    ("redis+sentinel://10.0.0.1:26379", "names no Sentinel or service"),
    ("redis://localhost:6379/notadb", "is not valid"),
])
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse(url)


def test_credentials_never_reach_messages() -> None:
    assert redact("redis://user:s3cret@db:6379/0") == "redis://db:6379/0"
    assert redact("redis+sentinel://:pw@a:1,b:2/m") == "redis+sentinel://a:1,b:2/m"
    with pytest.raises(ConfigError) as err:
        parse("redis://user:s3cret@db:6379/x")
    assert "s3cret" not in str(err.value)


def test_cluster_url_names_its_seed_nodes() -> None:
    t = parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2")
    assert t.cluster and t.sentinels == (("10.0.0.1", 7000), ("10.0.0.2", 6379)) and t.password == "pw"
    with pytest.raises(ConfigError, match="database 0 only"):
        parse("redis+cluster://10.0.0.1:7000/3")


def test_cluster_slots_follow_hash_tags() -> None:
    # Reference values from the Redis Cluster specification (CRC16/XMODEM mod 16384).
    assert slot("123456789") == 0x31C3 % 16384
    assert slot("foo") == 12182
    assert slot("ferry:{m:model}:v1:requests") == slot("ferry:{m:model}:v1:queued") == slot("m:model")
    assert slot("{}x") == slot("{}x") != slot("x")  # an empty tag: the whole key is hashed


def test_cluster_commands_route_by_their_key() -> None:
    assert key_of(["EVALSHA", "sha", 2, "k1", "k2", "arg"]) == "k1"
    assert key_of(["EVALSHA", "sha", 0, "arg"]) is None
    assert key_of(["XREADGROUP", "GROUP", "g", "c", "COUNT", 5, "STREAMS", "s1", ">"]) == "s1"
    assert key_of(["BLMPOP", 1, 1, "list", "LEFT"]) == "list"
    assert key_of(["XINFO", "CONSUMERS", "stream", "g"]) == "stream"
    assert key_of(["SCRIPT", "LOAD", "return 1"]) is None
    assert key_of(["XADD", "stream", "*", "f", "v"]) == "stream"


def test_tls_files_are_rediss_only_and_must_exist(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    t = parse(f"rediss://u:p@h:6380/2?ssl_ca_certs={ca}")
    assert (t.ssl_ca_certs, t.db, t.port) == (str(ca), 2, 6380)
    with pytest.raises(ConfigError, match="rediss:// only"):
        parse(f"redis://h?ssl_ca_certs={ca}")
    with pytest.raises(ConfigError, match=r"ssl_certfile .* is not a readable file"):
        parse("rediss://h?ssl_certfile=/nonexistent.pem")
    assert parse("redis://h").ssl_context() is None
