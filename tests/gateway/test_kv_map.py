"""The KV map read from a real Redis: every block's state and every table, checked against the
pool's own snapshot (`RedisBlockPool.snapshot`, a different read of the same keys), and the
size of the map of a 100,000-block pool under load on the wire."""

from __future__ import annotations

import asyncio
import gzip
import json
import random

import pytest
import redis
import redis.asyncio

from pagedserve.gateway.kv_map import (
    CACHED,
    FREE,
    delta_runs,
    encode_body,
    expand_delta_runs,
    expand_runs,
    read_pool_maps,
)
from pagedserve.scheduler.block_pool import StepOps
from pagedserve.scheduler.redis_pool import RedisBlockPool

WAITING, RUNNING = "1", "2"


def params(request_id: str, index: int) -> str:
    return json.dumps({"rid": request_id, "i": index, "s": {}})


def save(ops: StepOps, seq_id: str, request_id: str, index: int, status: str = RUNNING) -> None:
    ops.save(
        seq_id,
        prompt_token_ids=[1, 2, 3],
        params_json=params(request_id, index),
        priority=0,
        status=status,
        num_computed_tokens=7,
        output_token_ids=[],
    )


def read_map(url: str, pool_id: str):
    async def go():
        client = redis.asyncio.Redis.from_url(url)
        try:
            return await read_pool_maps(client, [pool_id, "no-such-pool"])
        finally:
            await client.aclose()

    maps = asyncio.run(go())
    assert maps["no-such-pool"] is None
    return maps[pool_id]


def expected_codes(pool: RedisBlockPool) -> list[int]:
    snap = pool.snapshot()
    codes = [FREE] * snap.num_blocks
    for block in snap.lru:
        codes[block] = CACHED
    for block, cnt in snap.ref.items():
        codes[block] = cnt
    return codes


def test_map_matches_the_pool(redis_url: str) -> None:
    pool = RedisBlockPool(redis.Redis.from_url(redis_url), "p1")
    pool.init(64, 4, "epoch", "m")
    ops = StepOps()
    save(ops, "a", "req-a", -1)  # the prompt sequence of an n = 3 request
    ops.allocate("a", 3)
    ops.register("a", 0, "h0", "", [1, 2, 3, 4])
    for i in range(3):
        save(ops, f"a.{i}", "req-a", i)
        ops.fork("a", f"a.{i}")
    save(ops, "b", "req-b", 0)
    ops.allocate("b", 2)
    ops.register("b", 0, "hb", "", [9, 9, 9, 9])
    save(ops, "w", "req-w", 0, status=WAITING)
    pool.apply(ops)
    ops = StepOps()
    ops.cow("a.2")  # a.2's last block becomes its own
    ops.drop("b")  # b's hashed block stays cached, the other goes free
    pool.apply(ops)

    got = read_map(redis_url, "p1")
    codes = expand_runs(got.blocks)
    assert codes == expected_codes(pool)
    assert codes[:3] == [4, 4, 3] and CACHED in codes  # shared by a and its three choices
    assert (got.num_blocks, got.block_size, got.model) == (64, 4, "m")
    counts = pool.counts()
    assert (got.free, got.used, got.cached) == (counts.num_free, counts.num_used, counts.num_cached)
    tables = pool.snapshot().tables
    by_id = {s.seq_id: s for s in got.sequences}
    assert set(by_id) == {"a", "a.0", "a.1", "a.2", "w"}
    for seq_id, seq in by_id.items():
        assert seq.block_table == delta_runs(tables.get(seq_id, []))
        assert expand_delta_runs(seq.to_json()["block_table"]) == tables.get(seq_id, [])
    assert (by_id["a.1"].request_id, by_id["a.1"].index, by_id["a.1"].status) == ("req-a", 1, "running")
    assert (by_id["a"].index, by_id["w"].status, by_id["w"].num_computed_tokens) == (-1, "waiting", 7)


def test_swapped_sequences_show_their_cpu_blocks(redis_url: str) -> None:
    pool = RedisBlockPool(redis.Redis.from_url(redis_url), "p-swap")
    pool.init(32, 4, "epoch", "m", num_cpu_blocks=16)
    ops = StepOps()
    save(ops, "s", "req-s", -1)
    ops.allocate("s", 3)
    for i in range(2):
        save(ops, f"s.{i}", "req-s", i)
        ops.fork("s", f"s.{i}")
    ops.drop("s")
    pool.apply(ops)
    ops = StepOps()
    ops.swap_out(["s.0", "s.1"], [3, 3])  # both choices' shared blocks go to 3 CPU blocks
    ops.update("s.0", "4", 12, ())
    ops.update("s.1", "4", 12, ())
    pool.apply(ops)

    got = read_map(redis_url, "p-swap")
    snap = pool.snapshot()
    assert expand_runs(got.blocks) == [FREE] * 32  # no device block held
    cpu = expand_runs(got.to_json()["cpu"]["blocks"])
    assert len(cpu) == 16 and sorted(c for c in cpu if c) == [2, 2, 2]  # sharing kept on CPU
    assert got.swapped == 3 and got.to_json()["counts"]["swapped"] == 3
    for seq in got.sequences:
        assert seq.status == "swapped" and seq.block_table == []
        assert expand_delta_runs(seq.cpu_block_table) == snap.cpu_tables[seq.seq_id]


def test_delta_runs_round_trip() -> None:
    rng = random.Random(7)
    assert delta_runs([]) == [] and delta_runs([5]) == [5]
    assert delta_runs([3, 4, 5, 6]) == [3, 1, 3]
    assert delta_runs([0, 8, 16, 24, 2]) == [0, 8, 3, -22, 1]
    for _ in range(200):
        ids = rng.sample(range(1000), rng.randint(0, 60))
        if rng.random() < 0.5:
            ids.sort()
        assert expand_delta_runs(delta_runs(ids)) == ids


def start_request(ops: StepOps, r: int) -> list[str]:
    """Request `r` with n = 4: a 32-block prompt, forked to four choices that share it."""
    save(ops, f"r{r}", f"cmpl-{r}", -1)
    ops.allocate(f"r{r}", 32)
    children = []
    for c in range(4):
        save(ops, f"r{r}.{c}", f"cmpl-{r}", c)
        ops.fork(f"r{r}", f"r{r}.{c}")
        children.append(f"r{r}.{c}")
    ops.drop(f"r{r}")
    return children


def fill_like_a_busy_server(pool: RedisBlockPool, rng: random.Random) -> int:
    """64 requests of n = 4 at a time, each prompt 32 blocks shared by its four choices; every
    step each choice takes a decode block, in turns, and every 10 steps two requests finish
    (their blocks go back to the free list's tail) and two new ones start, so that blocks
    are reused out of order; before all that, 10,000 blocks of finished requests cached.
    Returns the number of sequences."""
    ops = StepOps()
    for r in range(40):  # finished requests whose full blocks stay cached
        save(ops, f"done{r}", f"done{r}", 0)
        ops.allocate(f"done{r}", 250)
        for i in range(250):
            ops.register(f"done{r}", i, f"d{r}.{i}", "", [r, i])
    for r in range(40):
        ops.drop(f"done{r}")
    pool.apply(ops)
    ops = StepOps()
    running = {r: start_request(ops, r) for r in range(64)}
    pool.apply(ops)
    for step in range(300):
        ops = StepOps()
        if step % 10 == 9:
            for r in rng.sample(sorted(running), 2):
                for child in running.pop(r):
                    ops.drop(child)
            for r in range(max(running) + 1, max(running) + 3):
                running[r] = start_request(ops, r)
        children = [c for r in running.values() for c in r]
        rng.shuffle(children)  # the order of a step's sequences changes as requests come and go
        for child in children:
            ops.allocate(child, 1)
        pool.apply(ops)
    return sum(len(c) for c in running.values())


@pytest.mark.timeout(120)
def test_wire_size_of_a_100k_block_pool(redis_url: str) -> None:
    pool = RedisBlockPool(redis.Redis.from_url(redis_url), "big")
    pool.init(100_000, 16, "epoch", "m")
    num_seqs = fill_like_a_busy_server(pool, random.Random(1))
    got = read_map(redis_url, "big")
    assert expand_runs(got.blocks) == expected_codes(pool)
    assert len(got.sequences) == num_seqs == 256
    tables = pool.snapshot().tables
    assert all(expand_delta_runs(s.block_table) == tables[s.seq_id] for s in got.sequences)
    body = {"object": "kv_map", "time_ms": 0, "pools": [{"pool_id": "big", **got.to_json()}]}
    raw, _ = encode_body(body, "")
    zipped, headers = encode_body(body, "gzip, deflate")
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(zipped) == raw
    blocks = len(json.dumps(got.blocks, separators=(",", ":")))
    print(
        f"\n100k-block map, {num_seqs} sequences: {len(raw)} bytes of JSON "
        f"({blocks} for the block states), {len(zipped)} gzipped"
    )
    # Stated in docs/DASHBOARD.md; the bounds keep the encoding from silently growing.
    assert blocks < 200_000
    assert len(raw) < 700_000 and len(zipped) < 200_000
