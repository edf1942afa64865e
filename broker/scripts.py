"""Lua scripts: state changes that must be atomic in Redis, documented in one place.

Each script touches keys of one hash tag only, so it also runs on Redis Cluster.
"""

from __future__ import annotations

# Deliver one reply bundle to a gateway, but only while that gateway is alive.
# KEYS[1] = gateway_alive(gw), KEYS[2] = reply_list(gw)
# ARGV[1] = reply list TTL in ms, ARGV[2] = the bundle
# Returns 1 when delivered, 0 when the gateway is gone (the bundle is dropped:
# nobody waits for it, and pushing would recreate a key nobody deletes).
PUSH_REPLY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
