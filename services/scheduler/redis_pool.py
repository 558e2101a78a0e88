"""`BlockPool` in Redis: the durable replica of a pool, a step in one EVALSHA.

The scheduler's in-process `BlockManager` decides; this replica re-runs each step's op log
in a Lua script that interprets the ops exactly as the manager ran them, so Redis ends in the
same state — the record a restarted or standby scheduler resumes from, and the index other
services read. Writes carry the writer's fencing token (`Lease`), so a scheduler that lost
its lease cannot change the pool.
"""

from __future__ import annotations

import json

import redis

from pagedserve.common.errors import Fenced
from pagedserve.scheduler.block_manager import HashEntry, PoolSnapshot
from pagedserve.scheduler.block_pool import (
    BlockPool,
    PoolCounts,
    StepOps,
    StepResult,
    StoredRequest,
    decode_result,
    parse_outputs,
)
from pagedserve.scheduler.fsck import fsck
from pagedserve.scheduler.redis_keys import PoolKeys
from pagedserve.scheduler.redis_lua import STEP_LUA
from pagedserve.scheduler.redis_lua_pool import COUNTS_LUA, INIT_LUA, LOAD_LUA, SEED_LUA

FENCED = "PAGEDSERVE_FENCED"


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
        self.fence = 0
        self.num_cpu_blocks = 0
        # redis-py's Script runs EVALSHA and loads the script once on NOSCRIPT.
        self._step = client.register_script(STEP_LUA)
        self._init = client.register_script(INIT_LUA)
        self._load = client.register_script(LOAD_LUA)
        self._seed = client.register_script(SEED_LUA)
        self._counts = client.register_script(COUNTS_LUA)

    @classmethod
    def from_url(cls, url: str, pool_id: str) -> RedisBlockPool:
        from pagedserve.common.redis_connect import connect

        return cls(connect(url), pool_id)

    def _run(self, script, keys: list[str], args: list) -> object:
        try:
            return script(keys=keys, args=args)
        except redis.exceptions.ResponseError as err:
            if FENCED in str(err):
                raise Fenced(str(err).split(" ", 1)[-1]) from None
            raise

    def init(self, num_blocks: int, block_size: int, epoch: str, model: str, num_cpu_blocks: int = 0) -> bool:
        self.num_blocks, self.block_size, self.epoch, self.model = num_blocks, block_size, epoch, model
        self.num_cpu_blocks = num_cpu_blocks
        kept = self._run(
            self._init,
            [self.keys.meta],
            [num_blocks, block_size, epoch, model, "0", self.fence, num_cpu_blocks],
        )
        return bool(int(kept))

    def reset(self, epoch: str | None = None) -> PoolCounts:
        if epoch is not None:
            self.epoch = epoch
        args = [
            self.num_blocks,
            self.block_size,
            self.epoch,
            self.model,
            "1",
            self.fence,
            self.num_cpu_blocks,
        ]
        self._run(self._init, [self.keys.meta], args)
        return self.counts()

    def apply(self, ops: StepOps, fence: int | None = None) -> StepResult:
        ops_json, progress = ops.encode()
        token = self.fence if fence is None else fence
        reply = json.loads(self._run(self._step, [self.keys.meta], [ops_json, progress, token, ops.load]))
        raw = reply["r"] if isinstance(reply["r"], list) else []
        results = [decode_result(op, r) for op, r in zip(ops.ops, raw, strict=True)]
        return StepResult(results, PoolCounts(int(reply["f"]), int(reply["c"]), int(reply["u"])))

    def counts(self) -> PoolCounts:
        # A script, not MULTI: atomic on a Redis Cluster too (the three keys share one slot).
        free, cached, used = self._counts(keys=[self.keys.key(k) for k in ("free", "lru", "ref")])
        return PoolCounts(int(free), int(cached), int(used))

    # --- reading back, writing whole ---------------------------------------------------

    def _load_raw(self) -> dict:
        raw = self._load(
            keys=[self.keys.meta], args=[self.keys.table_scan_pattern, self.keys.ctable_scan_pattern]
        )
        if not raw:
            raise LookupError(f"pool {self.pool_id!r} is not in Redis")
        return json.loads(raw)

    def snapshot(self) -> PoolSnapshot:
        raw = self._load_raw()
        hash_map = {}
        for h, value in _pairs(raw["hash"]):
            block, parent, tokens = value.split("|", 2)
            hash_map[h] = HashEntry(int(block), parent, tokens)
        return PoolSnapshot(
            num_blocks=int(raw["num_blocks"]),
            block_size=int(raw["block_size"]),
            free_list=_ints(raw["free"]),
            ref={int(b): int(c) for b, c in _pairs(raw["ref"])},
            lru=_ints(raw["lru"]),
            hash_map=hash_map,
            tables={rid: _ints(t) for rid, t in _pairs(raw["tables"])},
            tick=int(raw.get("tick") or 0),
            num_cpu_blocks=int(raw.get("num_cpu_blocks") or 0),
            cpu_free_list=_ints(raw["cfree"]),
            cpu_ref={int(b): int(c) for b, c in _pairs(raw["cref"])},
            cpu_tables={rid: _ints(t) for rid, t in _pairs(raw["ctables"])},
        )

    def load_requests(self) -> list[StoredRequest]:
        raw = self._load_raw()
        out = []
        for rid, state, outs in raw["reqs"] if isinstance(raw["reqs"], list) else []:
            out.append(StoredRequest.from_fields(rid, dict(_pairs(state)), parse_outputs(outs)))
        return out

    def seed(self, snap: PoolSnapshot, requests: list[list], epoch: str, model: str) -> None:
        """Write the whole pool as `snap` says, and these request states (SAVE op fields)."""
        body = {
            "num_blocks": snap.num_blocks,
            "block_size": snap.block_size,
            "epoch": epoch,
            "model": model,
            "tick": snap.tick,
            "free": snap.free_list,
            "ref": [[b, c] for b, c in snap.ref.items()],
            "lru": snap.lru,
            "hash": [[h, f"{e.block}|{e.parent_hash}|{e.tokens}"] for h, e in snap.hash_map.items()],
            "tables": [[rid, t] for rid, t in snap.tables.items()],
            "reqs": requests,
            "num_cpu_blocks": snap.num_cpu_blocks,
            "cfree": snap.cpu_free_list,
            "cref": [[b, c] for b, c in snap.cpu_ref.items()],
            "ctables": [[rid, t] for rid, t in snap.cpu_tables.items()],
        }
        self.num_blocks, self.block_size, self.epoch, self.model = (
            snap.num_blocks,
            snap.block_size,
            epoch,
            model,
        )
        self.num_cpu_blocks = snap.num_cpu_blocks
        self._run(self._seed, [self.keys.meta], [json.dumps(body, separators=(",", ":")), self.fence])

    def check(self) -> list[str]:
        return fsck(self.client, self.pool_id)

    def close(self) -> None:
        self.client.close()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat) -> list[tuple]:
    flat = flat if isinstance(flat, list) else []  # cjson encodes an empty table as {}
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _ints(values) -> list[int]:
    return [int(v) for v in values] if isinstance(values, list) else []
