"""The pool registry in Redis: which executor pools exist, where their schedulers answer, and
their load — what every gateway routes by, read from the source of truth.

| key | type | holds |
|---|---|---|
| `pagedserve:pools` | set | every pool id ever registered (a pool is live while its lease key exists) |
| `pagedserve:{ID}:info` | hash | `scheduler` (the address gateways dial), `executor`, `model`, `block_size`, `num_blocks`, `holder` (the lease holder), `since` (ms) |
| `pagedserve:{ID}:load` | hash | `running`, `waiting`, `available` (free + evictable blocks), `tokens` (tokens held by running sequences), `ms` (when) — written by every step script |
| `pagedserve:{ID}:lease` | string | the lease (see `scheduler/lease.py`); no key, no pool |

A pool's own keys share its hash tag, so in a Redis Cluster each pool lives in one slot; the
set of pool ids is one key of its own, read and written by separate commands. Reading every
pool is one pipeline, never a script that spans pools: one round trip on a single node, and
on a Cluster the client sends each node its part at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

REGISTRY_KEY = "pagedserve:pools"


def pool_key(pool_id: str, name: str) -> str:
    return f"pagedserve:{{{pool_id}}}:{name}"


@dataclass(slots=True)
class PoolLoad:
    running: int = 0
    waiting: int = 0
    available: int = 0  # blocks an allocation may take (free + evictable)
    tokens: int = 0  # tokens held by running sequences
    ms: int = 0  # when the scheduler wrote it (unix ms)


@dataclass(slots=True)
class PoolInfo:
    pool_id: str
    scheduler: str  # host:port
    executor: str = ""
    model: str = ""
    block_size: int = 0
    num_blocks: int = 0
    holder: str = ""
    since: int = 0  # ms
    live: bool = False  # its lease key exists
    load: PoolLoad | None = None


def register(client, pool_id: str, *, scheduler: str, executor: str, model: str, block_size: int,
             num_blocks: int, holder: str) -> None:  # fmt: skip
    """Announce a pool under its new lease holder (a plain write: the lease makes it ours)."""
    pipe = client.pipeline(transaction=False)
    pipe.sadd(REGISTRY_KEY, pool_id)
    pipe.hset(
        pool_key(pool_id, "info"),
        mapping={
            "scheduler": scheduler,
            "executor": executor,
            "model": model,
            "block_size": block_size,
            "num_blocks": num_blocks,
            "holder": holder,
            "since": int(time.time() * 1000),
        },
    )
    pipe.execute()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def read_pools(client, *, only_live: bool = True) -> list[PoolInfo]:
    """Every registered pool with its info and load: two round trips (the ids, then one
    pipeline over the pools)."""
    ids = sorted(_text(i) for i in client.smembers(REGISTRY_KEY))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    _queue_reads(pipe, ids)
    return _parse(ids, pipe.execute(), only_live)


async def read_pools_async(client, *, only_live: bool = True) -> list[PoolInfo]:
    """`read_pools` over a `redis.asyncio` client."""
    ids = sorted(_text(i) for i in await client.smembers(REGISTRY_KEY))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    _queue_reads(pipe, ids)
    return _parse(ids, await pipe.execute(), only_live)


def _queue_reads(pipe, ids: list[str]) -> None:
    for pool_id in ids:
        pipe.hgetall(pool_key(pool_id, "info"))
        pipe.hgetall(pool_key(pool_id, "load"))
        pipe.exists(pool_key(pool_id, "lease"))


def _parse(ids: list[str], replies: list, only_live: bool) -> list[PoolInfo]:
    pools = []
    for i, pool_id in enumerate(ids):
        info, load, live = replies[3 * i : 3 * i + 3]
        info = {_text(k): _text(v) for k, v in info.items()}
        load = {_text(k): _text(v) for k, v in load.items()}
        if not info.get("scheduler") or (only_live and not live):
            continue
        pools.append(
            PoolInfo(
                pool_id=pool_id,
                scheduler=info["scheduler"],
                executor=info.get("executor", ""),
                model=info.get("model", ""),
                block_size=int(info.get("block_size") or 0),
                num_blocks=int(info.get("num_blocks") or 0),
                holder=info.get("holder", ""),
                since=int(info.get("since") or 0),
                live=bool(live),
                load=PoolLoad(
                    *(int(load.get(k) or 0) for k in ("running", "waiting", "available", "tokens", "ms"))
                )
                if load
                else None,
            )
        )
    return pools
