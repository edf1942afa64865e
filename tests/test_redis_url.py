"""The Redis URL forms Ferry accepts (ferry.redis_url), and the errors for the ones it does not."""

from __future__ import annotations

import pytest

from ferry.errors import ConfigError
from ferry.redis_url import parse, redact


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
