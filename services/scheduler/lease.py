"""One writer per pool: a lease in Redis and a fencing token that only grows.

A scheduler holds pool P while the key `pagedserve:{P}:lease` names it; the key has a TTL the
holder renews every third of it. Taking the lease raises the pool's fencing token (kept in
the pool's `meta` hash), and every write script compares the writer's token with it, so a
scheduler that paused past its TTL and woke up after a takeover is refused at its next
write instead of corrupting the pool. A second scheduler for the same pool is a standby: it
retries `acquire` until the lease lapses.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import redis

from pagedserve.scheduler.redis_keys import PoolKeys

log = logging.getLogger(__name__)

# The lease: KEYS[1] = meta, KEYS[2] = the lease key; ARGV: holder, ttl ms, lowest token to hand out.
# Taken when free (or already ours); the fencing token only grows, even over a Redis that lost
# its data (the caller passes the last token it saw).
ACQUIRE_LUA = r"""
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {0, redis.call('PTTL', KEYS[2])} end
local token = math.max(tonumber(redis.call('HGET', KEYS[1], 'fence') or '0'), tonumber(ARGV[3])) + 1
redis.call('HSET', KEYS[1], 'fence', string.format('%d', token))
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {token, tonumber(ARGV[2])}
"""

# Renew: ARGV holder, ttl ms, token. 1 when still ours, 0 when the lease or the token moved on.
RENEW_LUA = r"""
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[3] then
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Give the lease up at a clean stop, so a standby need not wait for the TTL.
RELEASE_LUA = r"""
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) return 1 end
return 0
"""


def holder_id() -> str:
    """Who holds a lease: host, pid and a random part (a restarted process is someone new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(
        self, client: redis.Redis, pool_id: str, ttl: float = 3.0, holder: str | None = None
    ) -> None:
        self.client = client
        self.keys = PoolKeys(pool_id)
        self.lease_key = self.keys.key("lease")
        self.ttl_ms = max(int(ttl * 1000), 100)
        self.holder = holder or holder_id()
        self.token = 0  # the fencing token while held; the last one held otherwise
        # Renewing and taking the lease again run on worker threads (the renewer and a whole
        # write can both find the key gone): one at a time, so `token` is always the last one
        # Redis handed out, never an older answer that came back later.
        self.lock = threading.RLock()
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)

    @property
    def renew_interval(self) -> float:
        return self.ttl_ms / 3000

    def acquire(self) -> float:
        """Take the lease if it is free (or ours): 0.0 and `token` set; else the seconds it
        still has to run, for a standby to wait."""
        with self.lock:
            token, ttl_left = self._acquire(
                keys=[self.keys.meta, self.lease_key], args=[self.holder, self.ttl_ms, self.token]
            )
            if int(token) > 0:
                self.token = int(token)
                return 0.0
        return max(int(ttl_left), 0) / 1000

    def renew(self) -> bool:
        """Extend the lease; False when another scheduler took it (stop writing at once)."""
        with self.lock:
            ok = self._renew(
                keys=[self.keys.meta, self.lease_key], args=[self.holder, self.ttl_ms, self.token]
            )
            return bool(int(ok))

    def release(self) -> None:
        """Give the lease up (a clean stop), so a standby takes over without waiting for the TTL."""
        try:
            self._release(keys=[self.keys.meta, self.lease_key], args=[self.holder])
        except redis.exceptions.RedisError as err:
            log.warning("could not release the lease of pool %s: %s", self.keys.pool_id, err)
