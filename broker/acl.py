"""The least privilege each component needs in Redis: commands, keys and channels (Redis 7 ACLs).

One ACL user per component, so a leaked gateway credential cannot, say, delete a pool's
batches or read worker registrations it has no use for.  The rules follow broker.keys
(every key pattern here is one of its layouts) and every command Ferry sends, including the
ones inside its Lua scripts (broker.scripts), which Redis checks against the caller's ACL:

* common to all: connecting (AUTH, HELLO, SELECT, PING), reading the server's version and
  role (INFO, ROLE), Redis Cluster routing (READONLY, ASKING, CLUSTER SLOTS/SHARDS) and
  loading and running Ferry's scripts (SCRIPT LOAD/EXISTS, EVALSHA, EVAL);
* keys: read (``%R~``) or read-write (``%RW~``) per pattern, nothing else;
* pub/sub: only brokers subscribe and workers publish, to ``ferry:{p:*}:done``;
* nothing administrative: no CONFIG, FLUSH*, KEYS, SCAN, DEBUG, MONITOR, SHUTDOWN, ACL.

``ferry redis-acl`` prints the ``ACL SETUSER`` lines (and docs/security.md shows them);
``tests/test_redis_acl.py`` runs a cluster whose components each log in as their own user
with exactly these rules, against a real redis-server, and fails on any ACL denial.
"""

from __future__ import annotations

from broker import keys

COMMON = (
    "ping", "auth", "hello", "select", "info", "role", "readonly", "asking", "cluster|slots", "cluster|shards",
    "script|load", "script|exists", "evalsha", "eval",
)

P = keys.PREFIX
MODELS, POOLS, GATEWAYS = f"{P}:{{m:*", f"{P}:{{p:*", f"{P}:{{g:*"
WORKER_INFO = f"{P}:worker:*"

# role -> (commands, read-write key patterns, read-only key patterns, channel patterns)
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "gateway": (
        # requests in (ENQUEUE: GET, INCRBY, XADD; the edge's transaction: MULTI, INCRBY, XADD, EXEC),
        # cancellations (XADD), statistics (HINCRBY, HGETALL), replies out (LPOP, BLPOP, BLMPOP), its heartbeat
        # (SET, DEL), the worker registry (ZRANGEBYSCORE, pruned with ZREMRANGEBYSCORE, and GET of each registration)
        ("get", "set", "del", "incrby", "xadd", "multi", "exec", "hincrby", "hgetall", "lpop", "blpop", "blmpop",
         "zrangebyscore", "zremrangebyscore"),
        (MODELS, GATEWAYS, keys.WORKERS),
        (WORKER_INFO,),
        (),
    ),
    "broker": (
        # request streams (XREADGROUP, XACK, XDEL, XPENDING, XCLAIM, XRANGE, XLEN, XINFO, XGROUP), the queue
        # counters (ACK_REQUESTS: DECRBY, DEL), batches to pools (XADD), replies it decides itself (PUSH_REPLY:
        # EXISTS, RPUSH, PEXPIRE), statistics, the registries, wake-up signals (LPUSH, LTRIM, PEXPIRE) and
        # done notices (SUBSCRIBE)
        ("get", "del", "exists", "incrby", "decrby", "pexpire", "xadd", "xreadgroup", "xack", "xdel", "xpending",
         "xclaim", "xrange", "xlen", "xinfo|groups", "xinfo|consumers", "xinfo|stream", "xgroup|create",
         "xgroup|delconsumer", "xgroup|createconsumer", "hincrby", "hgetall", "rpush", "lpush", "ltrim", "zadd",
         "zrem", "zrangebyscore", "zremrangebyscore", "subscribe", "unsubscribe"),
        (MODELS, POOLS, GATEWAYS, keys.BROKERS, keys.WORKERS),
        (WORKER_INFO,),
        (f"{P}:{{p:*",),
    ),
    "worker": (
        # batches (XREADGROUP, XACK, XDEL, XPENDING, XCLAIM, XADD to dead letters), replies (PUSH_REPLY), its
        # registration and heartbeat (SET, ZADD, ZREM, DEL of the wake-up signal), statistics and done notices
        ("get", "set", "del", "exists", "pexpire", "xadd", "xreadgroup", "xack", "xdel", "xpending", "xclaim",
         "xrange", "xlen", "xinfo|groups", "xinfo|consumers", "xgroup|create", "xgroup|delconsumer",
         "xgroup|createconsumer", "rpush", "hincrby", "hset", "zadd", "zrem", "zrangebyscore", "zremrangebyscore",
         "publish"),
        (POOLS, GATEWAYS, MODELS, keys.WORKERS, WORKER_INFO),
        (keys.BROKERS,),
        (f"{P}:{{p:*",),
    ),
}


def rules(role: str) -> list[str]:
    """The ACL SETUSER arguments (after the user name and password) for ``role``."""
    commands, rw, ro, channels = RULES[role]
    out = ["resetkeys", "resetchannels", "-@all"]
    out += [f"+{c}" for c in (*COMMON, *commands)]
    out += [f"%RW~{k}" for k in rw] + [f"%R~{k}" for k in ro]
    out += [f"&{c}" for c in channels]
    return out


def setuser_lines(password_placeholder: str = "<password>") -> list[str]:
    return [f"ACL SETUSER ferry-{role} on >{password_placeholder} {' '.join(rules(role))}" for role in RULES]
