"""Block pool operations, against both implementations (in memory, and Redis via Lua)."""

from __future__ import annotations

from pagedserve.scheduler.block_pool import Admission, Allocation, BlockCopy, PoolCounts, StepOps, SwapMapping
from pagedserve.scheduler.hashing import ROOT_HASH, block_hash, token_str

SALT = b"test"


def step(pool, build):
    ops = StepOps()
    build(ops)
    return pool.apply(ops)


def chain_of(tokens: list[int], block_size: int) -> list[tuple[str, str, str, list[int]]]:
    """(hash, parent, token_str, tokens) of each full block of `tokens`."""
    out, parent = [], ROOT_HASH
    for i in range(len(tokens) // block_size):
        blk = tokens[i * block_size : (i + 1) * block_size]
        h = block_hash(parent, blk, SALT)
        out.append((h, parent, token_str(blk), blk))
        parent = h
    return out


def register_all(ops: StepOps, rid: str, tokens: list[int], block_size: int) -> None:
    for i, (h, parent, _, blk) in enumerate(chain_of(tokens, block_size)):
        ops.register(rid, i, h, parent, blk)


def test_allocate_takes_free_blocks_in_order(pool_factory):
    pool = pool_factory(num_blocks=8)
    res = step(pool, lambda o: (o.allocate("a", 3), o.allocate("b", 2)))
    assert res.results == [Allocation(True, [0, 1, 2]), Allocation(True, [3, 4])]
    assert res.counts == PoolCounts(num_free=3, num_cached=0, num_used=5)
    res = step(pool, lambda o: o.allocate("a", 1))
    assert res[0] == Allocation(True, [5])


def test_allocate_is_all_or_nothing(pool_factory):
    pool = pool_factory(num_blocks=4)
    res = step(pool, lambda o: (o.allocate("a", 3), o.allocate("b", 2), o.allocate("c", 1)))
    assert res.results == [Allocation(True, [0, 1, 2]), Allocation(False, []), Allocation(True, [3])]
    assert res.counts == PoolCounts(0, 0, 4)


def test_free_returns_unhashed_blocks_to_the_free_list_tail(pool_factory):
    pool = pool_factory(num_blocks=6)
    step(pool, lambda o: (o.allocate("a", 2), o.allocate("b", 2)))
    res = step(pool, lambda o: o.free("a"))
    assert res.counts == PoolCounts(4, 0, 2)
    # the free list is [4, 5] then a's blocks last block first: [1, 0]
    res = step(pool, lambda o: o.allocate("c", 4))
    assert res[0] == Allocation(True, [4, 5, 1, 0])


def test_free_caches_hashed_blocks_and_evicts_the_tail_first(pool_factory):
    pool = pool_factory(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    step(pool, lambda o: (o.allocate("a", 3), register_all(o, "a", tokens, 2)))
    res = step(pool, lambda o: o.free("a"))
    assert res.counts == PoolCounts(num_free=1, num_cached=3, num_used=0)
    # one free block, then LRU eviction: block 2 (a's last) before block 1 before block 0
    res = step(pool, lambda o: o.allocate("b", 3))
    assert res[0] == Allocation(True, [3, 2, 1])
    assert res.counts == PoolCounts(0, 1, 3)
    # evicted hashes are dropped: only the first block can still hit
    chain = [(h, ts) for h, _, ts, _ in chain_of(tokens, 2)]
    step(pool, lambda o: o.free("b"))  # unhashed blocks: back on the free list
    res = step(pool, lambda o: o.admit("c", chain, 6, 6))
    assert res[0] == Admission(True, 1, [0, 1, 2])  # b freed last block first: [1, 2, 3]


def test_admit_hits_confirmed_chain_and_touches_lru(pool_factory):
    pool = pool_factory(num_blocks=8, block_size=2)
    tokens = [7, 8, 9, 10, 11, 12, 13]
    chain = chain_of(tokens, 2)
    step(pool, lambda o: (o.allocate("a", 4), register_all(o, "a", tokens, 2)))
    step(pool, lambda o: o.free("a"))  # blocks 0..2 cached, 3 free
    assert pool.counts() == PoolCounts(5, 3, 0)
    pairs = [(h, ts) for h, _, ts, _ in chain]
    res = step(pool, lambda o: o.admit("b", pairs, len(tokens), 100))
    assert res[0] == Admission(True, 3, [0, 1, 2, 4])  # 3 hits; 7 tokens need 4 blocks
    assert res.counts == PoolCounts(num_free=4, num_cached=0, num_used=4)  # touched: out of the LRU
    # a second request hitting blocks already in use shares them (ref_cnt 2)
    res = step(pool, lambda o: o.admit("c", pairs[:2], len(tokens), 1))
    assert res[0] == Admission(True, 2, [0, 1, 5])  # 4 hit tokens + 1 new token
    assert res.counts == PoolCounts(3, 0, 5)
    res = step(pool, lambda o: (o.free("b"), o.free("c")))
    assert res.counts == PoolCounts(num_free=5, num_cached=3, num_used=0)


def test_admit_stops_at_first_miss_and_confirms_tokens(pool_factory):
    pool = pool_factory(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    step(pool, lambda o: (o.allocate("a", 3), register_all(o, "a", tokens, 2)))
    chain = [(h, ts) for h, _, ts, _ in chain_of(tokens, 2)]
    # a chain whose second block's tokens differ from what is stored under that hash
    forged = [chain[0], (chain[1][0], token_str([9, 9])), chain[2]]
    res = step(pool, lambda o: o.admit("b", forged, 6, 6))
    assert res[0].num_hit_blocks == 1
    # the right hash with the wrong parent position is not a hit either
    res = step(pool, lambda o: o.admit("c", [chain[1]], 6, 6))
    assert res[0].num_hit_blocks == 0


def test_admit_is_all_or_nothing(pool_factory):
    pool = pool_factory(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4]
    step(pool, lambda o: (o.allocate("a", 2), register_all(o, "a", tokens, 2)))
    step(pool, lambda o: o.free("a"))
    step(pool, lambda o: o.allocate("x", 2))  # takes the 2 free blocks; the 2 cached remain
    pairs = [(h, ts) for h, _, ts, _ in chain_of(tokens, 2)]
    res = step(pool, lambda o: o.admit("b", pairs, 10, 10))  # 2 hits + 3 fresh > 2 available
    assert res[0] == Admission(False, 0, [])
    assert res.counts == PoolCounts(0, 2, 2)
    res = step(pool, lambda o: o.admit("b", pairs, 4, 10))
    assert res[0] == Admission(True, 2, [0, 1])


def test_fork_shares_the_table_and_free_keeps_shared_blocks(pool_factory):
    pool = pool_factory(num_blocks=8)
    step(pool, lambda o: o.allocate("p", 3))
    res = step(pool, lambda o: (o.fork("p", "c1"), o.fork("p", "c2"), o.free("p")))
    assert res.counts == PoolCounts(5, 0, 3)
    res = step(pool, lambda o: o.free("c1"))
    assert res.counts == PoolCounts(5, 0, 3)
    res = step(pool, lambda o: o.free("c2"))
    assert res.counts == PoolCounts(8, 0, 0)


def test_cow_copies_only_a_shared_last_block(pool_factory):
    pool = pool_factory(num_blocks=8)
    step(pool, lambda o: o.allocate("p", 2))
    res = step(pool, lambda o: (o.fork("p", "c0"), o.fork("p", "c1"), o.fork("p", "c2"), o.free("p")))
    res = step(pool, lambda o: (o.cow("c0"), o.cow("c1"), o.cow("c2")))
    # the first two children get copies; the last one is then the only owner and writes in place
    assert res.results == [BlockCopy(True, 1, 2), BlockCopy(True, 1, 3), BlockCopy(True, -1, -1)]
    assert res.counts == PoolCounts(4, 0, 4)
    res = step(pool, lambda o: (o.allocate("c0", 1), o.free("c1")))
    assert res[0] == Allocation(True, [4])
    assert res.counts == PoolCounts(4, 0, 4)  # c1's own block 3 freed; block 0 still shared


def test_cow_fails_cleanly_without_a_free_block(pool_factory):
    pool = pool_factory(num_blocks=2)
    step(pool, lambda o: (o.allocate("p", 2), o.fork("p", "c")))
    res = step(pool, lambda o: o.cow("c"))
    assert res[0] == BlockCopy(False, -1, -1)
    assert res.counts == PoolCounts(0, 0, 2)


def test_register_keeps_the_first_block_for_a_hash(pool_factory):
    pool = pool_factory(num_blocks=8, block_size=2)
    tokens = [5, 6, 7, 8]
    # two requests computed the same prefix at once: only the first block is cached
    step(pool, lambda o: (o.allocate("a", 2), o.allocate("b", 2)))
    step(pool, lambda o: (register_all(o, "a", tokens, 2), register_all(o, "b", tokens, 2)))
    res = step(pool, lambda o: (o.free("a"), o.free("b")))
    assert res.counts == PoolCounts(num_free=6, num_cached=2, num_used=0)


def test_state_ops_write_request_records(pool_factory):
    pool = pool_factory()
    res = step(
        pool,
        lambda o: (
            o.save(
                "r",
                prompt_token_ids=[1, 2],
                params_json="{}",
                priority=3,
                status=1,
                num_computed_tokens=0,
                output_token_ids=[],
            ),
            o.allocate("r", 1),
        ),
    )
    assert res[1].ok
    # progress writes run before the step's other operations, so they come a step after the save
    res = step(pool, lambda o: (o.update("r", 2, 2, [42]), o.update("r", 2, 3, [43, 44])))
    if hasattr(pool, "outputs"):
        assert pool.outputs["r"] == "42,43,44,"
        assert pool.states["r"]["num_computed_tokens"] == "3"
    else:
        assert pool.client.get(pool.keys.out("r")) == b"42,43,44,"
        assert pool.client.hget(pool.keys.req("r"), "num_computed_tokens") == b"3"
        assert pool.client.sismember(pool.keys.key("reqs"), "r")
    step(pool, lambda o: o.drop("r"))
    assert pool.counts() == PoolCounts(8, 0, 0)


def test_reset_and_init(pool_factory):
    pool = pool_factory(num_blocks=6, block_size=2)
    tokens = [1, 2, 3, 4]
    step(pool, lambda o: (o.allocate("a", 2), register_all(o, "a", tokens, 2), o.allocate("b", 1)))
    # same executor (geometry, epoch, model): tables freed, the cache kept
    assert pool.init(6, 2, "epoch-0", "model") is True
    assert pool.counts() == PoolCounts(num_free=4, num_cached=2, num_used=0)
    # a new epoch: everything dropped
    assert pool.init(6, 2, "epoch-1", "model") is False
    assert pool.counts() == PoolCounts(6, 0, 0)
    step(pool, lambda o: (o.allocate("a", 2), register_all(o, "a", tokens, 2)))
    assert pool.reset() == PoolCounts(6, 0, 0)
    pairs = [(h, ts) for h, _, ts, _ in chain_of(tokens, 2)]
    res = step(pool, lambda o: o.admit("c", pairs, 4, 4))
    assert res[0] == Admission(True, 0, [0, 1])


def test_fsck_reports_each_broken_invariant(redis_client, redis_url, capsys):
    from argparse import Namespace

    from pagedserve.scheduler import fsck as fsck_cli
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    pool = RedisBlockPool(redis_client, "broken")
    pool.init(6, 2, "e", "m")
    tokens = [1, 2, 3, 4]
    step(pool, lambda o: (o.allocate("a", 2), register_all(o, "a", tokens, 2)))
    assert fsck_cli.main(Namespace(redis_url=redis_url, pool="broken")) == 0
    keys = pool.keys
    redis_client.hset(keys.key("ref"), "0", 2)  # a reference no table holds
    redis_client.rpush(keys.key("free"), "1")  # a used block also on the free list
    redis_client.rpush(keys.table("ghost"), "5")  # a table of an unknown request, block 5 unreferenced
    problems = fsck_cli.fsck(redis_client, "broken")
    assert "block 0: ref_cnt 2 but 1 block-table entries" in problems
    assert "block 1: is free+used (must be exactly one)" in problems
    assert "block 1: on the free list with a hash" in problems
    assert "block 5: ref_cnt 0 but 1 block-table entries" in problems
    assert "request ghost: has a block table but is not in the request set" in problems
    assert any(p.startswith("free 5 + used 2 + cached 0 = 7 != 6") for p in problems)
    assert fsck_cli.main(Namespace(redis_url=redis_url, pool="broken")) == 1
    assert "problem(s)" in capsys.readouterr().out


def test_swap_out_keeps_sharing_one_cpu_block_per_gpu_block(pool_factory):
    pool = pool_factory(num_blocks=8, num_cpu_blocks=6)
    step(pool, lambda o: o.allocate("p", 2))  # blocks 0, 1
    step(pool, lambda o: (o.fork("p", "c0"), o.fork("p", "c1"), o.drop("p")))
    res = step(pool, lambda o: (o.cow("c1"), o.allocate("c0", 1)))  # c1: [0, 2]; c0: [0, 1, 3]
    assert res.results == [BlockCopy(True, 1, 2), Allocation(True, [3])]
    # c0 keeps only 2 blocks' KV (the third was never written): 0, 1 for c0 and 0, 2 for c1
    res = step(pool, lambda o: o.swap_out(["c0", "c1"], [2, 2]))
    assert res[0] == SwapMapping(True, [(0, 0), (1, 1), (2, 2)])  # block 0 shared: one CPU block
    assert res.counts == PoolCounts(8, 0, 0)
    snap = pool.snapshot()
    assert snap.cpu_tables == {"c0": [0, 1], "c1": [0, 2]}
    assert snap.cpu_ref == {0: 2, 1: 1, 2: 1}
    assert snap.cpu_free_list == [3, 4, 5]
    # swap in: one GPU block per distinct CPU block, taken from the free list's head
    res = step(pool, lambda o: o.swap_in(["c0", "c1"]))
    gpu = pool.snapshot().tables
    assert res[0].ok and len(res[0].pairs) == 3
    mapping = dict(res[0].pairs)
    assert gpu == {"c0": [mapping[0], mapping[1]], "c1": [mapping[0], mapping[2]]}
    assert pool.snapshot().ref[mapping[0]] == 2
    assert pool.snapshot().cpu_free_list == [3, 4, 5, 1, 2, 0]  # c0's table last block first, then c1's
    assert res.counts == PoolCounts(5, 0, 3)


def test_swap_is_all_or_nothing(pool_factory):
    pool = pool_factory(num_blocks=4, num_cpu_blocks=2)
    step(pool, lambda o: (o.allocate("a", 3), o.allocate("b", 1)))
    res = step(pool, lambda o: o.swap_out(["a"], [3]))
    assert res[0] == SwapMapping(False, [])  # 3 blocks, 2 CPU blocks: nothing changed
    assert pool.snapshot().tables == {"a": [0, 1, 2], "b": [3]}
    res = step(pool, lambda o: (o.swap_out(["b"], [1]), o.allocate("c", 3), o.swap_in(["b"])))
    assert res.results == [SwapMapping(True, [(3, 0)]), Allocation(False, []), SwapMapping(True, [(0, 3)])]
    res = step(pool, lambda o: (o.swap_out(["b"], [1]), o.allocate("c", 1), o.swap_in(["b"])))
    assert res.results[2] == SwapMapping(False, [])  # no GPU block left for b: it stays swapped
    assert pool.snapshot().cpu_tables == {"b": [1]}


def test_free_and_drop_release_cpu_tables(pool_factory):
    pool = pool_factory(num_blocks=4, num_cpu_blocks=4)
    step(pool, lambda o: (o.allocate("a", 2), o.allocate("b", 2)))
    step(pool, lambda o: (o.swap_out(["a"], [2]), o.swap_out(["b"], [1])))
    res = step(pool, lambda o: (o.free("a"), o.drop("b")))
    assert res.counts == PoolCounts(4, 0, 0)
    snap = pool.snapshot()
    assert snap.cpu_tables == {} and snap.cpu_ref == {} and sorted(snap.cpu_free_list) == [0, 1, 2, 3]


def test_init_frees_cpu_tables_and_a_new_epoch_resets_the_swap_space(pool_factory):
    pool = pool_factory(num_blocks=6, block_size=2, num_cpu_blocks=4)
    tokens = [1, 2, 3, 4]
    step(pool, lambda o: (o.allocate("a", 2), register_all(o, "a", tokens, 2), o.allocate("b", 2)))
    step(pool, lambda o: o.swap_out(["b"], [2]))
    # same executor: the cache is kept, every table (device and CPU) freed
    assert pool.init(6, 2, "epoch-0", "model", 4) is True
    snap = pool.snapshot()
    assert (snap.cpu_tables, snap.cpu_ref, sorted(snap.cpu_free_list)) == ({}, {}, [0, 1, 2, 3])
    assert pool.counts() == PoolCounts(num_free=4, num_cached=2, num_used=0)
    # another swap space size means another executor: everything reset
    assert pool.init(6, 2, "epoch-0", "model", 3) is False
    assert pool.snapshot().cpu_free_list == [0, 1, 2]


def test_fsck_reports_broken_cpu_blocks(redis_client):
    from pagedserve.scheduler import fsck as fsck_cli
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    pool = RedisBlockPool(redis_client, "broken-cpu")
    pool.init(6, 2, "e", "m", 4)
    step(pool, lambda o: (o.allocate("a", 2), o.swap_out(["a"], [2])))
    assert fsck_cli.fsck(redis_client, "broken-cpu") == []
    keys = pool.keys
    redis_client.hset(keys.key("cref"), "0", 3)  # more references than CPU-table entries
    redis_client.rpush(keys.key("cfree"), "1")  # a swapped block also free
    redis_client.rpush(keys.ctable("ghost"), "3")  # a CPU table of an unknown request
    problems = fsck_cli.fsck(redis_client, "broken-cpu")
    assert "cpu block 0: ref_cnt 3 but 1 cpu-table entries" in problems
    assert "cpu block 1: is free+swapped (must be exactly one)" in problems
    assert "cpu block 3: ref_cnt 0 but 1 cpu-table entries" in problems
    assert "request ghost: has a cpu table but is not in the request set" in problems
    assert "cpu free 3 + swapped 2 = 5 != 4" in problems
