"""`pagedserve fsck`: check a KV pool's block accounting, directly in Redis.

The checks are the `BlockPool` invariants: every block is exactly one of free, used
(ref_cnt > 0) or cached-evictable (ref_cnt == 0 with a hash); each ref_cnt equals the number
of block-table entries that point at the block; free + used + cached == total; the hash map
and the blocks' hashes agree one to one; no block table belongs to an unknown request. The
CPU blocks of the swap space: each exactly one of free or used (by swapped-out sequences' CPU
tables), ref counts equal to CPU-table entries, free + used == total.
The pool is read in one Lua call, so a live scheduler's steps never show half-applied.
`pagedserve fsck --redis-url URL` checks every pool in the registry (`--pool ID`: that one)
and exits 1 when any has a problem.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Iterable

from pagedserve.common.redis_connect import url_arg
from pagedserve.scheduler.redis_keys import PoolKeys
from pagedserve.scheduler.redis_lua_pool import SCAN_CPU_TABLES_LUA, SCAN_TABLES_LUA

# Reads the whole pool at once. KEYS[1] = the meta key; ARGV[1], ARGV[2] = SCAN patterns of
# table and ctable keys.
SNAPSHOT_LUA = (
    r"""
local meta = KEYS[1]
local P = string.sub(meta, 1, #meta - 4)
if redis.call('EXISTS', meta) == 0 then return false end
local out = {}
out.num_blocks = tonumber(redis.call('HGET', meta, 'num_blocks'))
out.free = redis.call('LRANGE', P .. 'free', 0, -1)
out.ref = redis.call('HGETALL', P .. 'ref')
out.lru = redis.call('ZRANGE', P .. 'lru', 0, -1)
local hashes = redis.call('HGETALL', P .. 'hash')
local hash_block = {}
for i = 1, #hashes, 2 do
  local v = hashes[i + 1]
  hash_block[#hash_block + 1] = hashes[i]
  hash_block[#hash_block + 1] = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
end
out.hash = hash_block
out.bhash = redis.call('HGETALL', P .. 'bhash')
out.reqs = redis.call('SMEMBERS', P .. 'reqs')
out.num_cpu_blocks = tonumber(redis.call('HGET', meta, 'num_cpu_blocks') or '0')
out.cfree = redis.call('LRANGE', P .. 'cfree', 0, -1)
out.cref = redis.call('HGETALL', P .. 'cref')
"""
    + SCAN_TABLES_LUA
    + r"""
out.tables = tables
"""
    + SCAN_CPU_TABLES_LUA
    + r"""
out.ctables = ctables
return cjson.encode(out)
"""
)


def check_state(
    *,
    num_blocks: int,
    free_list: list[int],
    ref: dict[int, int],
    lru: list[int],
    hash_map: dict[str, int],
    block_hash: dict[int, str],
    tables: dict[str, list[int]],
    reqs: Iterable[str] | None = None,
) -> list[str]:
    """Every broken invariant of one pool snapshot, one line each."""
    problems: list[str] = []
    where: dict[int, list[str]] = defaultdict(list)
    for block in free_list:
        where[block].append("free")
    for block, cnt in ref.items():
        where[block].append("used")
        if cnt <= 0:
            problems.append(f"block {block}: ref_cnt {cnt} stored (only counts > 0 are kept)")
    for block in lru:
        where[block].append("cached")
    for block in range(num_blocks):
        states = where.get(block, [])
        if len(states) != 1:
            problems.append(f"block {block}: is {'+'.join(states) or 'nowhere'} (must be exactly one)")
    for block in sorted(set(where) - set(range(num_blocks))):
        problems.append(f"block {block}: outside the pool [0, {num_blocks})")
    for rid, table in tables.items():
        if len(set(table)) != len(table):
            problems.append(f"request {rid}: block table {table} holds a block twice")
    entries = Counter(block for table in tables.values() for block in table)
    for block in sorted(set(entries) | set(ref)):
        if entries.get(block, 0) != ref.get(block, 0):
            problems.append(
                f"block {block}: ref_cnt {ref.get(block, 0)} but {entries.get(block, 0)} block-table entries"
            )
    for h, block in hash_map.items():
        if block_hash.get(block) != h:
            problems.append(f"hash {h[:12]}: maps to block {block}, whose hash is {block_hash.get(block)}")
    for block, h in block_hash.items():
        if hash_map.get(h) != block:
            problems.append(f"block {block}: hash {h[:12]} maps to block {hash_map.get(h)}")
    hashed = set(block_hash)
    for block in lru:
        if block not in hashed:
            problems.append(f"block {block}: cached-evictable without a hash")
    for block in free_list:
        if block in hashed:
            problems.append(f"block {block}: on the free list with a hash")
    total = len(free_list) + len(ref) + len(lru)
    if total != num_blocks:
        problems.append(
            f"free {len(free_list)} + used {len(ref)} + cached {len(lru)} = {total} != {num_blocks}"
        )
    if reqs is not None:
        known = set(reqs)
        for rid in sorted(set(tables) - known):
            problems.append(f"request {rid}: has a block table but is not in the request set")
    return problems


def check_cpu_state(
    *,
    num_cpu_blocks: int,
    cpu_free_list: list[int],
    cpu_ref: dict[int, int],
    cpu_tables: dict[str, list[int]],
    reqs: Iterable[str] | None = None,
) -> list[str]:
    """Every broken invariant of the CPU blocks (swap space), one line each."""
    problems: list[str] = []
    where: dict[int, list[str]] = defaultdict(list)
    for block in cpu_free_list:
        where[block].append("free")
    for block, cnt in cpu_ref.items():
        where[block].append("swapped")
        if cnt <= 0:
            problems.append(f"cpu block {block}: ref_cnt {cnt} stored (only counts > 0 are kept)")
    for block in range(num_cpu_blocks):
        states = where.get(block, [])
        if len(states) != 1:
            problems.append(f"cpu block {block}: is {'+'.join(states) or 'nowhere'} (must be exactly one)")
    for block in sorted(set(where) - set(range(num_cpu_blocks))):
        problems.append(f"cpu block {block}: outside the swap space [0, {num_cpu_blocks})")
    entries = Counter(block for table in cpu_tables.values() for block in table)
    for block in sorted(set(entries) | set(cpu_ref)):
        if entries.get(block, 0) != cpu_ref.get(block, 0):
            problems.append(
                f"cpu block {block}: ref_cnt {cpu_ref.get(block, 0)} but {entries.get(block, 0)} cpu-table entries"
            )
    for rid, table in cpu_tables.items():
        if len(set(table)) != len(table):
            problems.append(f"request {rid}: cpu table {table} holds a block twice")
    total = len(cpu_free_list) + len(cpu_ref)
    if total != num_cpu_blocks:
        problems.append(
            f"cpu free {len(cpu_free_list)} + swapped {len(cpu_ref)} = {total} != {num_cpu_blocks}"
        )
    if reqs is not None:
        for rid in sorted(set(cpu_tables) - set(reqs)):
            problems.append(f"request {rid}: has a cpu table but is not in the request set")
    return problems


def fsck(redis_client, pool_id: str) -> list[str]:
    """Check pool `pool_id` in Redis; returns the problems found (empty when consistent)."""
    keys = PoolKeys(pool_id)
    raw = redis_client.eval(SNAPSHOT_LUA, 1, keys.meta, keys.table_scan_pattern, keys.ctable_scan_pattern)
    if not raw:
        return [f"pool {pool_id!r}: not found ({keys.meta} does not exist)"]
    snap = json.loads(raw)
    if snap.get("num_blocks") is None:
        return [f"pool {pool_id!r}: not initialized ({keys.meta} has no num_blocks)"]

    def pairs(flat) -> list[tuple]:
        flat = flat if isinstance(flat, list) else []
        return list(zip(flat[0::2], flat[1::2], strict=True))

    def ints(values) -> list[int]:
        return [int(v) for v in values] if isinstance(values, list) else []

    tables = {rid: ints(table) for rid, table in pairs(snap["tables"])}
    reqs = snap["reqs"] if isinstance(snap["reqs"], list) else []
    return check_state(
        num_blocks=int(snap["num_blocks"]),
        free_list=ints(snap["free"]),
        ref={int(b): int(c) for b, c in pairs(snap["ref"])},
        lru=ints(snap["lru"]),
        hash_map={h: int(b) for h, b in pairs(snap["hash"])},
        block_hash={int(b): h for b, h in pairs(snap["bhash"])},
        tables=tables,
        reqs=reqs,
    ) + check_cpu_state(
        num_cpu_blocks=int(snap.get("num_cpu_blocks") or 0),
        cpu_free_list=ints(snap["cfree"]),
        cpu_ref={int(b): int(c) for b, c in pairs(snap["cref"])},
        cpu_tables={rid: ints(table) for rid, table in pairs(snap["ctables"])},
        reqs=reqs,
    )


def registered_pool_ids(redis_client) -> list[str]:
    """Every pool id in the registry, live or not: a lapsed pool's accounting is still kept."""
    from pagedserve.common.pool_registry import REGISTRY_KEY

    return sorted(i.decode() if isinstance(i, bytes) else i for i in redis_client.smembers(REGISTRY_KEY))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        type=url_arg,
        required=True,
        help="Redis holding the pools, e.g. redis://localhost:6379/0 (Sentinel and Cluster URLs too: see README)",
    )
    parser.add_argument(
        "--pool",
        default=None,
        help="pool id (the scheduler's --pool-id); default: every pool in the registry",
    )


def main(args: argparse.Namespace) -> int:
    from pagedserve.common.redis_connect import check, connect

    client = connect(args.redis_url, decode_responses=True)
    try:
        check(client, args.redis_url, strict=True)
        pool_ids = [args.pool] if args.pool else registered_pool_ids(client)
        results = {pool_id: fsck(client, pool_id) for pool_id in pool_ids}
    finally:
        client.close()
    if not pool_ids:
        print("no pools registered")
    for pool_id, problems in results.items():
        for line in problems:
            print(f"pool {pool_id}: {line}" if len(pool_ids) > 1 else line)
        print(f"pool {pool_id}: {'clean' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if any(results.values()) else 0
