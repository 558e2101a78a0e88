"""Random interleavings of every pool operation across many requests: after each step the
Redis pool passes fsck and answers exactly as the in-memory pool does."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.scheduler.block_pool import StepOps
from pagedserve.scheduler.hashing import ROOT_HASH, block_hash, token_str
from pagedserve.scheduler.memory_pool import InMemoryBlockPool
from pagedserve.scheduler.redis_pool import RedisBlockPool

NUM_BLOCKS, BLOCK_SIZE, NUM_CPU_BLOCKS = 12, 2, 6
REQUESTS = [f"r{i}" for i in range(8)]
# A few token streams sharing prefixes, so that admissions hit, miss and half-hit.
STREAMS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 7, 8], [5, 6, 7, 8, 1, 2, 3, 4]]
_pool_ids = itertools.count()


def chain(stream: list[int]) -> list[tuple[str, str, list[int]]]:
    out, parent = [], ROOT_HASH
    for i in range(len(stream) // BLOCK_SIZE):
        blk = stream[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
        h = block_hash(parent, blk, b"prop")
        out.append((h, parent, blk))
        parent = h
    return out


CHAINS = [chain(s) for s in STREAMS]

rid = st.sampled_from(REQUESTS)
op = st.one_of(
    st.tuples(st.just("alloc"), rid, st.integers(0, 4)),
    st.tuples(st.just("free"), rid),
    st.tuples(st.just("drop"), rid),
    st.tuples(
        st.just("admit"), rid, st.integers(0, 2), st.integers(0, 4), st.integers(1, 9), st.integers(1, 9)
    ),
    st.tuples(st.just("fork"), rid, rid),
    st.tuples(st.just("cow"), rid),
    st.tuples(st.just("reg"), rid, st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("swapout"), st.lists(rid, min_size=1, max_size=3, unique=True), st.integers(0, 5)),
    st.tuples(st.just("swapin"), st.lists(rid, min_size=1, max_size=3, unique=True)),
)


def add(ops: StepOps, spec: tuple) -> None:
    kind = spec[0]
    if kind == "alloc":
        ops.allocate(spec[1], spec[2])
    elif kind == "free":
        ops.free(spec[1])
    elif kind == "drop":
        ops.drop(spec[1])
    elif kind == "admit":
        _, r, stream, length, num_tokens, num_new = spec
        pairs = [(h, token_str(blk)) for h, _, blk in CHAINS[stream][:length]]
        ops.admit(r, pairs, num_tokens, num_new)
    elif kind == "fork":
        ops.fork(spec[1], spec[2])
    elif kind == "cow":
        ops.cow(spec[1])
    elif kind == "swapout":
        ops.swap_out(spec[1], [spec[2] + i for i in range(len(spec[1]))])
    elif kind == "swapin":
        ops.swap_in(spec[1])
    else:
        _, r, stream, index = spec
        h, parent, blk = CHAINS[stream][index]
        ops.register(r, index, h, parent, blk)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.lists(op, min_size=1, max_size=4), min_size=1, max_size=25))
def test_random_steps_keep_invariants_and_match_memory(redis_client, steps):
    pool = RedisBlockPool(redis_client, f"prop-{next(_pool_ids)}")
    pool.init(NUM_BLOCKS, BLOCK_SIZE, "e", "m", NUM_CPU_BLOCKS)
    mirror = InMemoryBlockPool(NUM_BLOCKS, BLOCK_SIZE, "e", "m", NUM_CPU_BLOCKS)
    for specs in steps:
        ops = StepOps()
        for spec in specs:
            add(ops, spec)
        got, want = pool.apply(ops), mirror.apply(ops)
        assert got == want, specs
        assert pool.check() == [], specs
        assert mirror.check() == [], specs
        assert got.counts.num_total == NUM_BLOCKS
    assert pool.snapshot().differences(mirror.snapshot()) == []
