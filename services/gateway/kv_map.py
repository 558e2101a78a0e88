"""The KV map: every block of every pool, and the sequences that hold them, read from Redis.

`GET /v1/kv/map` and the dashboard draw from this. Each pool is read by one Lua call
(`KV_MAP_LUA`, read-only), so a live scheduler's step never shows half-applied, and every
pool's call goes out in one pipeline. Redis time is what the pool's writer waits behind, so
the script only gathers (each table joined into one string, C speed, no per-block Lua); the
gateway counts references, run-length encodes and formats, off its event loop.

Wire format of one pool (`PoolMap.to_json`), all block ids 0-based:
- `blocks`: runs `[code, count, code, count, ...]` over blocks 0..num_blocks-1, where a code
  > 0 is a block in use with that ref_cnt, `0` free, `-1` cached-evictable (ref_cnt 0, still
  in the prefix cache) (`-2`, swapped, is kept for pools that would mark one: a swapped-out
  sequence's KV lives in CPU blocks, and its device blocks are free);
- `cpu`: the CPU (swap) pool, `{num_blocks, blocks}` in the same encoding (a code > 0: a CPU
  block holding swapped-out KV, with its ref_cnt); `counts.swapped` is how many are in use;
- `sequences`: each sequence with a state in Redis — `seq_id`, `request_id`, `index` (choice,
  -1 for the prompt sequence an n > 1 request forks from), `status` (`running`, `waiting`,
  `finished`, `swapped`), `num_computed_tokens`, and `block_table` as `[first, delta, count, ...]`
  (`delta_runs`: a table is usually a few runs of evenly spaced ids), `cpu_block_table` likewise.

A block's ref_cnt is counted from the block tables, which fsck checks equal the stored `ref`
(reading `ref` as well would cost Redis a third more). Every Redis read of the map is in
`KV_MAP_LUA`, and decoded in `PoolMap.from_reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import time
from dataclasses import dataclass, field

from pagedserve.common.errors import NotFound, Unavailable
from pagedserve.common.stats import SchedulerStats
from pagedserve.scheduler.redis_keys import PoolKeys

FREE, CACHED, SWAPPED = 0, -1, -2
STATUS_NAMES = {"1": "waiting", "2": "running", "3": "finished", "4": "swapped"}

# KEYS[1] = the pool's meta key. Read-only: safe beside a writing scheduler, and on a replica.
# Answers [num_blocks, block_size, model, free count, used count, "lru,ids", num_cpu_blocks, then
# per sequence seq_id, status, num_computed_tokens, params JSON, "table,ids", "cpu,table,ids"].
KV_MAP_LUA = r"""
local meta = KEYS[1]
local P = string.sub(meta, 1, #meta - 4)
if redis.call('EXISTS', meta) == 0 then return false end
local m = redis.call('HMGET', meta, 'num_blocks', 'block_size', 'model', 'num_cpu_blocks')
local out = {m[1] or '0', m[2] or '0', m[3] or '', redis.call('LLEN', P .. 'free'),
  redis.call('HLEN', P .. 'ref'), table.concat(redis.call('ZRANGE', P .. 'lru', 0, -1), ','), m[4] or '0'}
for _, sid in ipairs(redis.call('SMEMBERS', P .. 'reqs')) do
  local s = redis.call('HMGET', P .. 'req:' .. sid, 'status', 'num_computed_tokens', 'params')
  out[#out + 1] = sid
  out[#out + 1] = s[1] or ''
  out[#out + 1] = s[2] or '0'
  out[#out + 1] = s[3] or ''
  out[#out + 1] = table.concat(redis.call('LRANGE', P .. 'table:' .. sid, 0, -1), ',')
  out[#out + 1] = table.concat(redis.call('LRANGE', P .. 'ctable:' .. sid, 0, -1), ',')
end
return out
"""
_HEAD, _PER_SEQ = 7, 6


def delta_runs(block_ids: list[int]) -> list[int]:
    """[first, delta, count, delta, count, ...]: after `first`, `count` ids each `delta` past the
    one before. A table taken from a fresh free list is one run of delta 1; blocks that
    sequences decoding in lockstep took in turn are one run of delta = the number of them."""
    if not block_ids:
        return []
    out = [block_ids[0]]
    for prev, b in zip(block_ids, block_ids[1:], strict=False):
        if len(out) > 1 and out[-2] == b - prev:
            out[-1] += 1
        else:
            out += [b - prev, 1]
    return out


def expand_delta_runs(runs: list[int]) -> list[int]:
    """The block ids of `delta_runs` output."""
    if not runs:
        return []
    ids = [runs[0]]
    for delta, count in zip(runs[1::2], runs[2::2], strict=True):
        ids += [ids[-1] + delta * (i + 1) for i in range(count)]
    return ids


def expand_runs(runs: list[int]) -> list[int]:
    """The codes of `blocks` runs, one per block (the inverse of `value_runs`)."""
    out: list[int] = []
    for code, count in zip(runs[0::2], runs[1::2], strict=True):
        out += [code] * count
    return out


def value_runs(codes: list[int]) -> list[int]:
    """[code, count, ...] over `codes`: the `blocks` encoding."""
    out: list[int] = []
    for code, group in itertools.groupby(codes):
        out += [code, sum(1 for _ in group)]
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(joined: str) -> list[int]:
    return [int(v) for v in joined.split(",")] if joined else []


@dataclass(slots=True)
class SequenceMap:
    seq_id: str
    request_id: str
    index: int
    status: str  # running | waiting | finished
    num_computed_tokens: int
    block_table: list[int]  # delta runs (`delta_runs`) of its block ids
    cpu_block_table: list[int] = field(default_factory=list)  # swapped out: its CPU block ids, likewise

    def to_json(self) -> dict:
        return {
            "seq_id": self.seq_id,
            "request_id": self.request_id,
            "index": self.index,
            "status": self.status,
            "num_computed_tokens": self.num_computed_tokens,
            "block_table": self.block_table,
            "cpu_block_table": self.cpu_block_table,
        }


@dataclass(slots=True)
class PoolMap:
    num_blocks: int
    block_size: int
    model: str
    free: int
    used: int
    cached: int
    blocks: list[int]  # runs [code, count, ...]
    sequences: list[SequenceMap] = field(default_factory=list)
    swapped: int = 0
    cpu_num_blocks: int = 0
    cpu_blocks: list[int] = field(default_factory=list)

    @classmethod
    def from_reply(cls, reply: list) -> PoolMap:
        """From `KV_MAP_LUA`'s answer (bytes or str). CPU work: called off the event loop."""
        num_blocks, block_size, model, free, used, lru, num_cpu = (_text(v) for v in reply[:_HEAD])
        codes = [FREE] * int(num_blocks)
        cpu_codes = [FREE] * int(num_cpu or 0)  # CPU blocks: free, or the ref count of swapped KV
        sequences = []
        for at in range(_HEAD, len(reply), _PER_SEQ):
            seq_id, status, ncomp, params, table, ctable = (_text(v) for v in reply[at : at + _PER_SEQ])
            block_ids = _ints(table)
            for b in block_ids:
                if 0 <= b < len(codes):
                    codes[b] += 1
            cpu_ids = _ints(ctable)
            for b in cpu_ids:
                if 0 <= b < len(cpu_codes):
                    cpu_codes[b] += 1
            request_id, index = seq_id, 0
            with contextlib.suppress(ValueError, TypeError, KeyError):
                decoded = json.loads(params)
                request_id, index = str(decoded["rid"]), int(decoded["i"])
            sequences.append(
                SequenceMap(
                    seq_id=seq_id,
                    request_id=request_id,
                    index=index,
                    status=STATUS_NAMES.get(status.partition(".")[0], "unknown"),
                    num_computed_tokens=int(ncomp or 0),
                    block_table=delta_runs(block_ids),
                    cpu_block_table=delta_runs(cpu_ids),
                )
            )
        cached = _ints(lru)
        for b in cached:
            if 0 <= b < len(codes):
                codes[b] = CACHED
        sequences.sort(key=lambda s: (s.request_id, s.index))
        return cls(
            num_blocks=len(codes),
            block_size=int(block_size),
            model=model,
            free=int(free),
            used=int(used),
            cached=len(cached),
            blocks=value_runs(codes),
            sequences=sequences,
            swapped=sum(1 for c in cpu_codes if c > 0),
            cpu_num_blocks=len(cpu_codes),
            cpu_blocks=value_runs(cpu_codes) if cpu_codes else [],
        )

    def to_json(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "model": self.model,
            "counts": {"free": self.free, "used": self.used, "cached": self.cached, "swapped": self.swapped},
            "blocks": self.blocks,
            "cpu": {"num_blocks": self.cpu_num_blocks, "blocks": self.cpu_blocks},
            "sequences": [s.to_json() for s in self.sequences],
        }


async def read_pool_maps(client, pool_ids: list[str]) -> dict[str, PoolMap | None]:
    """Each pool's map (None: the pool is not in this Redis), one script call per pool, all in
    one pipelined round trip. `client` is a `redis.asyncio.Redis`."""
    if not pool_ids:
        return {}
    # EVAL, not EVALSHA: a pipeline of scripts checks SCRIPT EXISTS first, a second round trip.
    pipe = client.pipeline(transaction=False)
    for pool_id in pool_ids:
        pipe.eval(KV_MAP_LUA, 1, PoolKeys(pool_id).meta)
    replies = await pipe.execute()

    def decode() -> dict[str, PoolMap | None]:
        return {p: PoolMap.from_reply(r) if r else None for p, r in zip(pool_ids, replies, strict=True)}

    return await asyncio.to_thread(decode)


def stats_json(stats: SchedulerStats) -> dict:
    """The pool's counters from its scheduler (running totals: a page takes rates from deltas)."""
    hits, queries = stats.prefix_cache_hit_tokens, stats.prefix_cache_query_tokens
    return {
        "running": stats.requests_running,
        "waiting": stats.requests_waiting,
        "preemptions_total": stats.preemptions_total,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_query_tokens": queries,
        "prefix_hit_rate": hits / queries if queries else None,
        "generated_tokens_total": stats.generated_tokens_total,
        "steps_total": stats.steps_total,
        "kv_utilization": stats.kv_utilization,
        "swap_out_blocks_total": stats.swap_out_blocks_total,
        "swap_in_blocks_total": stats.swap_in_blocks_total,
    }


class KvMapReader:
    """`GET /v1/kv/map` over a `PoolRouter`: its pools, their scheduler's Stats (counters, and
    a static pool's id) and their blocks from Redis."""

    # Pages polling together share a read made within this many seconds.
    FRESH_FOR = 0.25

    def __init__(self, router, stats_timeout: float = 1.0) -> None:
        self.router = router
        self.stats_timeout = stats_timeout
        self._last: dict[str | None, tuple[float, dict]] = {}

    async def read(self, pool: str | None = None) -> dict:
        last = self._last.get(pool)
        if last is not None and time.monotonic() - last[0] < self.FRESH_FOR:
            return last[1]
        body = await self._read(pool)
        self._last = {k: v for k, v in self._last.items() if time.monotonic() - v[0] < self.FRESH_FOR}
        self._last[pool] = (time.monotonic(), body)
        return body

    async def _read(self, pool: str | None) -> dict:
        redis_client = getattr(self.router, "state_redis", None)
        if redis_client is None:
            raise Unavailable(
                "the KV map reads the pools' blocks from Redis: start the gateway with --redis-url "
                "(pools from the registry) or --kv-map-redis-url (the Redis of its --scheduler pools)"
            )
        if self.router.redis is not None and not self.router.pools:
            with contextlib.suppress(Exception):
                await self.router.refresh_pools()
        entries = list(self.router.pools.values())
        answers = await asyncio.gather(
            *(p.client.stats(self.stats_timeout) for p in entries), return_exceptions=True
        )
        pools = []
        for entry, stats in zip(entries, answers, strict=True):
            stats = stats if isinstance(stats, SchedulerStats) else None
            # A registry pool's id is its key; a static pool's is what its scheduler reports.
            pool_id = entry.info.pool_id if entry.info is not None else (stats.pool_id if stats else "")
            pools.append((pool_id, entry, stats))
        if pool is not None:
            pools = [p for p in pools if pool in (p[0], p[1].pool_id)]
            if not pools:
                known = ", ".join(sorted(p.pool_id for p in entries)) or "none"
                raise NotFound(
                    f"pool {pool!r} is not routed to by this gateway (pools: {known})", field="pool"
                )
        started = time.perf_counter()
        try:
            maps = await read_pool_maps(redis_client, sorted({p[0] for p in pools if p[0]}))
        except Exception as err:  # any Redis failure: the map is unavailable, the gateway is not
            raise Unavailable(f"cannot read the pools from Redis: {err}") from None
        out = []
        for pool_id, entry, stats in sorted(pools, key=lambda p: p[0] or p[1].pool_id):
            pool_map = maps.get(pool_id)
            scheduler = entry.info.scheduler if entry.info else ",".join(entry.client.addresses)
            body = {"pool_id": pool_id or entry.pool_id, "scheduler": scheduler}
            if not pool_id:
                body["error"] = f"its scheduler ({scheduler}) does not answer, so its pool id is unknown"
            elif pool_map is None:
                body["error"] = f"pool {pool_id!r} is not in Redis"
            else:
                body.update(pool_map.to_json())
            body["stats"] = stats_json(stats) if stats else None
            out.append(body)
        # read_ms: Redis and decoding; the page polls less often when a read costs much.
        read_ms = round((time.perf_counter() - started) * 1000, 1)
        return {"object": "kv_map", "time_ms": int(time.time() * 1000), "read_ms": read_ms, "pools": out}


GZIP_OVER = 4096  # bytes; a small map is not worth compressing


def encode_body(body: dict, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
    """The map as compact JSON, gzipped when the client takes it and it is large (CPU work:
    the route runs it off the event loop)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > GZIP_OVER and "gzip" in accept_encoding.lower():
        return gzip.compress(data, compresslevel=5), {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    return data, {"Vary": "Accept-Encoding"}
