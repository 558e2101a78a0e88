"""`BlockPool` in Redis: a step is one EVALSHA of a Lua script that interprets the op list.

Redis is the source of truth for a pool's accounting, so that a scheduler can restart and
other services can read cache state. The scheduler is the pool's only writer; it plans each
step with local counts and learns the block ids from the step's one reply.
"""

from __future__ import annotations

import json

import redis

from pagedserve.scheduler.block_pool import BlockPool, PoolCounts, StepOps, StepResult, decode_result
from pagedserve.scheduler.fsck import fsck
from pagedserve.scheduler.redis_keys import PoolKeys
from pagedserve.scheduler.redis_lua import INIT_LUA, STEP_LUA


class RedisBlockPool(BlockPool):
    """Pool `pool_id` in the Redis behind `client` (a `redis.Redis`; responses may be bytes or str)."""

    def __init__(self, client: redis.Redis, pool_id: str) -> None:
        self.client = client
        self.keys = PoolKeys(pool_id)
        self.pool_id = pool_id
        self.num_blocks = 0
        self.block_size = 0
        self.epoch = ""
        self.model = ""
        # redis-py's Script runs EVALSHA and loads the script once on NOSCRIPT.
        self._step = client.register_script(STEP_LUA)
        self._init = client.register_script(INIT_LUA)

    @classmethod
    def from_url(cls, url: str, pool_id: str) -> RedisBlockPool:
        return cls(redis.Redis.from_url(url), pool_id)

    def init(self, num_blocks: int, block_size: int, epoch: str, model: str) -> bool:
        self.num_blocks, self.block_size, self.epoch, self.model = num_blocks, block_size, epoch, model
        kept = self._init(keys=[self.keys.meta], args=[num_blocks, block_size, epoch, model, "0"])
        return bool(int(kept))

    def reset(self, epoch: str | None = None) -> PoolCounts:
        if epoch is not None:
            self.epoch = epoch
        self._init(
            keys=[self.keys.meta], args=[self.num_blocks, self.block_size, self.epoch, self.model, "1"]
        )
        return self.counts()

    def apply(self, ops: StepOps) -> StepResult:
        ops_json, progress = ops.encode()
        reply = json.loads(self._step(keys=[self.keys.meta], args=[ops_json, progress]))
        raw = reply["r"] if isinstance(reply["r"], list) else []
        results = [decode_result(op, r) for op, r in zip(ops.ops, raw, strict=True)]
        return StepResult(results, PoolCounts(int(reply["f"]), int(reply["c"]), int(reply["u"])))

    def counts(self) -> PoolCounts:
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.key("free"))
        pipe.zcard(self.keys.key("lru"))
        pipe.hlen(self.keys.key("ref"))
        free, cached, used = pipe.execute()
        return PoolCounts(int(free), int(cached), int(used))

    def check(self) -> list[str]:
        return fsck(self.client, self.pool_id)

    def close(self) -> None:
        self.client.close()
