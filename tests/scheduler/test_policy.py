"""The scheduling policy against a deterministic fake executor that checks every KV read.

Each test runs on both pools (in memory, and Redis); every block-table entry the fake
executor reads is checked against the tokens it must hold, so wrong prefix hits, missing
copy-on-writes and stale tables fail here.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from pagedserve.common.errors import InvalidArgument, ResourceExhausted
from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.scheduler import hashing
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.request import choice_seed

from .conftest import make_pool
from .fake_executor import EOS, FakeExecutor, reference
from .helpers import assert_pool_clean, drain, run_all, settle

VOCAB = 1000


@pytest.fixture(params=["memory", "redis"])
def build(request, redis_client):
    """`build(num_blocks, block_size, **limits)` -> (engine, fake executor)."""

    def make(num_blocks: int = 64, block_size: int = 4, **limits) -> tuple[SchedulerEngine, FakeExecutor]:
        fake = FakeExecutor(num_blocks, block_size, VOCAB, max_model_len=limits.pop("executor_max_len", 4096))
        pool = make_pool(request.param, redis_client, num_blocks, block_size)
        engine = asyncio.run(SchedulerEngine.connect(fake, pool, **limits))
        return engine, fake

    return make


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def run(engine, submissions: list[tuple[str, list[int], SamplingParams]], **kw):
    async def go():
        streams = [engine.submit(rid, p, s) for rid, p, s in submissions]
        results = await run_all(engine, streams)
        await settle(engine)
        return results

    return asyncio.run(go())


def test_one_request_generates_max_tokens(build):
    engine, _ = build()
    [prompt] = prompts([7])
    [out] = run(engine, [("a", prompt, greedy(9))])
    assert out.tokens[0] == reference(prompt, 9, VOCAB)
    assert out.finish[0] == FinishReason.LENGTH
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 9
    assert_pool_clean(engine)


def test_many_requests_share_steps_and_chunk_long_prompts(build):
    engine, fake = build(num_blocks=128, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
    ps = prompts([3, 50, 17, 1, 33, 8, 64, 5, 12, 40])
    outs = run(engine, [(f"r{i}", p, greedy(6)) for i, p in enumerate(ps)])
    for p, out in zip(ps, outs, strict=True):
        assert out.tokens[0] == reference(p, 6, VOCAB)
    assert max(len(s.new_requests) + len(s.cached_requests) for s in fake.steps) > 1
    assert all(s.total_num_scheduled_tokens <= 32 for s in fake.steps)
    assert all(len(s.new_requests) + len(s.cached_requests) <= 8 for s in fake.steps)
    assert engine.scheduler.stats.num_preemptions == 0
    assert_pool_clean(engine)


def test_preemption_by_recompute_when_blocks_run_out(build):
    # 24 blocks of 4 tokens; each request needs up to 10 blocks, 8 of them at once cannot fit.
    engine, _ = build(num_blocks=24, block_size=4, max_num_batched_tokens=64)
    ps = prompts([10, 14, 20, 9, 16, 12, 18, 11], seed=1)
    outs = run(engine, [(f"r{i}", p, greedy(16)) for i, p in enumerate(ps)])
    for p, out in zip(ps, outs, strict=True):
        assert out.tokens[0] == reference(p, 16, VOCAB)
    stats = engine.scheduler.stats
    assert stats.num_preemptions > 0
    assert stats.prefix_hit_tokens > 0  # recomputes come back through the prefix cache
    assert_pool_clean(engine)


def test_shared_prefix_second_request_computes_only_the_rest(build):
    engine, fake = build(num_blocks=64, block_size=4)
    prefix = prompts([20], seed=2)[0]  # 5 full blocks
    a, b = prefix + [11, 12, 13], prefix + [21, 22]
    [out_a] = run(engine, [("a", a, greedy(3))])
    steps_before = len(fake.steps)
    [out_b] = run(engine, [("b", b, greedy(3))])
    assert out_b.tokens[0] == reference(b, 3, VOCAB)
    assert out_b.cached_prompt_tokens == 20 and out_b.usage.cached_prompt_tokens == 20
    first = fake.steps[steps_before].new_requests[0]
    assert (first.num_computed_tokens, first.num_scheduled_tokens) == (20, 2)
    assert_pool_clean(engine)


@pytest.mark.parametrize("budget", [40, 24])
def test_a_prefix_sent_many_times_at_once_is_computed_once(build, budget):
    # Six requests with one 20-token prefix, sent together: the first computes the prefix, the
    # others share its blocks while that step is still planned or running (pending_prefix.py):
    # in the same step (budget 40) or the one planned while it runs (24). The fake executor
    # checks each of their reads against the tokens the blocks must hold.
    engine, fake = build(num_blocks=64, block_size=4, max_num_batched_tokens=budget)
    prefix = prompts([20], seed=4)[0]  # 5 full blocks
    subs = [(f"r{i}", prefix + [100 + i, 200 + i], greedy(3)) for i in range(6)]
    outs = run(engine, subs)
    for (_, p, _), out in zip(subs, outs, strict=True):
        assert out.tokens[0] == reference(p, 3, VOCAB)
    assert [o.usage.cached_prompt_tokens for o in outs] == [0] + [20] * 5
    new = [n for s in fake.steps for n in s.new_requests]
    assert [(n.num_computed_tokens, n.num_scheduled_tokens) for n in new] == [(0, 22)] + [(20, 2)] * 5
    assert all(n.block_ids[:5] == new[0].block_ids[:5] for n in new)
    assert len(fake.steps[0].new_requests) == (6 if budget == 40 else 2)
    assert_pool_clean(engine)


def test_forced_hash_collision_is_never_served(build, monkeypatch):
    monkeypatch.setattr(hashing, "block_hash", lambda parent, tokens, salt: "c0ffee")
    engine, fake = build(num_blocks=64, block_size=4)
    a, b = prompts([21, 21], seed=3)  # different tokens, all hashes equal
    outs = run(engine, [("a", a, greedy(4))])
    outs += run(engine, [("b", b, greedy(4))])
    assert outs[1].tokens[0] == reference(b, 4, VOCAB)
    assert outs[1].usage.cached_prompt_tokens == 0
    # the same prompt again may hit its first block only (the one entry the constant hash allows)
    outs += run(engine, [("a2", a, greedy(4))])
    assert outs[2].tokens[0] == reference(a, 4, VOCAB)
    assert outs[2].usage.cached_prompt_tokens <= 4
    assert_pool_clean(engine)


def test_parallel_sampling_forks_after_the_prompt(build):
    engine, fake = build(num_blocks=64, block_size=4)
    [prompt] = prompts([10], seed=4)  # the shared partial block holds tokens 8..9
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=1234, n=3, ignore_eos=True)
    [out] = run(engine, [("n3", prompt, params)])
    for i in range(3):
        assert out.tokens[i] == reference(prompt, 5, VOCAB, seed=choice_seed(1234, i))
    assert len({tuple(t) for t in out.tokens.values()}) == 3
    assert out.usage.completion_tokens == 15
    prompt_steps = [r for s in fake.steps for r in s.new_requests if r.request_id == "n3#prompt"]
    assert sum(r.num_scheduled_tokens for r in prompt_steps) == 9  # all but the last prompt token
    assert sum(len(s.block_copies) for s in fake.steps) == 2  # two children copy, the last writes in place
    children = [
        r
        for s in fake.steps
        for r in s.new_requests
        if r.request_id.startswith("n3#") and r.request_id[-1].isdigit()
    ]
    assert sorted((r.num_computed_tokens, r.num_scheduled_tokens) for r in children) == [(9, 1)] * 3
    assert_pool_clean(engine)


def test_parallel_sampling_with_a_block_aligned_prompt(build):
    engine, fake = build(num_blocks=64, block_size=4)
    [prompt] = prompts([9], seed=5)  # 8 tokens shared = two full blocks: no copy needed
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=7, n=2, ignore_eos=True)
    [out] = run(engine, [("n2", prompt, params)])
    for i in range(2):
        assert out.tokens[i] == reference(prompt, 3, VOCAB, seed=choice_seed(7, i))
    assert sum(len(s.block_copies) for s in fake.steps) == 0
    assert_pool_clean(engine)


def test_stop_conditions(build):
    engine, _ = build(num_blocks=64, block_size=4, max_model_len=40)
    [p] = prompts([6], seed=6)
    ref = reference(p, 30, VOCAB)
    outs = run(
        engine,
        [
            ("stop-id", p, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[ref[3]])),
            ("min", p, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[ref[3]], min_tokens=6)),
            ("len", p, greedy(20)),
        ],
    )
    stop, min_tokens, length = outs
    first_stop = ref.index(ref[3])
    assert stop.tokens[0] == ref[: first_stop + 1]
    assert (stop.finish[0], stop.stop_token[0]) == (FinishReason.STOP, ref[3])
    assert len(min_tokens.tokens[0]) >= 6
    assert length.finish[0] == FinishReason.LENGTH and len(length.tokens[0]) == 20
    assert_pool_clean(engine)


def test_eos_stops_unless_ignored(build, monkeypatch):
    from . import fake_executor

    real = fake_executor.next_token
    monkeypatch.setattr(
        fake_executor, "next_token", lambda t, s, v, low=3: EOS if len(t) == 9 else real(t, s, v, low)
    )
    engine, _ = build()
    [p] = prompts([6], seed=7)
    eos, ignored = run(
        engine,
        [
            ("eos", p, SamplingParams(max_tokens=10, temperature=0)),
            ("ignored", p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)),
        ],
    )
    assert eos.tokens[0][-1] == EOS and len(eos.tokens[0]) == 4
    assert (eos.finish[0], eos.stop_token[0]) == (FinishReason.STOP, EOS)
    assert len(ignored.tokens[0]) == 10 and ignored.finish[0] == FinishReason.LENGTH


def test_admission_refuses_what_can_never_fit(build):
    engine, _ = build(num_blocks=8, block_size=4, max_model_len=64, max_queued_requests=2)
    sched = engine.scheduler
    with pytest.raises(InvalidArgument, match="max_model_len=64"):
        engine.submit("long", list(range(3, 60)), greedy(10))
    with pytest.raises(InvalidArgument, match="needs 10 KV blocks of 4 tokens; the pool has 8"):
        engine.submit("big", list(range(3, 30)), greedy(10))
    # three choices of 4 blocks each sharing 2 full prompt blocks: 2 + 3 * 2 = 8 fit, 4 choices do not
    with pytest.raises(InvalidArgument, match="for each of n=4 choices needs 10 KV blocks of 4 tokens"):
        engine.submit("n4", list(range(3, 12)), greedy(7, n=4))
    with pytest.raises(InvalidArgument, match="max_tokens"):
        engine.submit("bad", [5], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        engine.submit("oov", [VOCAB + 5], greedy(1))
    assert sched.requests == {} and len(sched.blocks.log) == 0
    engine.submit("n3", list(range(3, 12)), greedy(7, n=3))
    engine.submit("q2", [5, 6], greedy(1))
    with pytest.raises(ResourceExhausted):
        engine.submit("q3", [5, 6], greedy(1))
    with pytest.raises(InvalidArgument, match="already in use"):
        engine.submit("n3", [5, 6], greedy(1))


def test_priority_orders_the_queue(build):
    engine, fake = build(num_blocks=64, block_size=4, max_num_seqs=1)
    ps = prompts([4, 4, 4], seed=8)

    async def go():
        streams = [
            engine.submit("low", ps[0], greedy(2), priority=5),
            engine.submit("high", ps[1], greedy(2), priority=-1),
            engine.submit("mid", ps[2], greedy(2), priority=0),
        ]
        return await run_all(engine, streams)

    asyncio.run(go())
    order = [r.request_id for s in fake.steps for r in s.new_requests]
    assert order == ["high", "mid", "low"]


def test_abort_frees_blocks(build):
    engine, fake = build(num_blocks=300, block_size=4, max_num_seqs=1)  # "q" stays queued
    [p] = prompts([9], seed=9)

    async def go():
        stream = engine.submit("a", p, greedy(1000 - 9 - 50))
        queued = engine.submit("q", p, greedy(5), priority=9)
        engine.start()
        while len(fake.steps) < 3:
            await asyncio.sleep(0.001)
        assert engine.scheduler.blocks.counts().num_used > 0
        assert engine.abort("a") and engine.abort("q")
        assert not engine.abort("nope")

        out = await asyncio.wait_for(drain(stream), 10)
        qout = await asyncio.wait_for(drain(queued), 10)
        await settle(engine)
        return out, qout

    out, qout = asyncio.run(go())
    assert out.finish[0] == FinishReason.ABORT and 0 < len(out.tokens[0]) < 900
    assert qout.finish.get(0) == FinishReason.ABORT and qout.tokens.get(0, []) == []
    assert "a" in fake.steps[-1].forget_request_ids or "a" not in fake.requests
    assert_pool_clean(engine)


def test_executor_restart_recomputes_and_streams_continue(build):
    engine, fake = build(num_blocks=48, block_size=4, max_num_batched_tokens=64)
    ps = prompts([5, 13, 8, 21], seed=10)

    async def go():
        streams = [engine.submit(f"r{i}", p, greedy(12)) for i, p in enumerate(ps)]
        fake.restart_before_step = 6  # mid-generation: every request has tokens, none is done
        results = await run_all(engine, streams)
        await settle(engine)
        return results

    outs = asyncio.run(go())
    for p, out in zip(ps, outs, strict=True):
        assert out.tokens[0] == reference(p, 12, VOCAB)
    assert engine.scheduler.stats.executor_restarts == 1
    assert engine.scheduler.epoch == fake.epoch
    assert_pool_clean(engine)


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_a_failed_replica_write_is_rewritten_whole(build, lost):
    """A step whose replica write fails (Redis unreachable: the script ran or not) does not stop
    the scheduler, which serves from its own view; the replica is rewritten whole once it
    answers, and ends equal to the scheduler's view."""
    engine, fake = build(num_blocks=64, block_size=4)
    pool = engine.pool
    real_apply = pool.apply
    calls = {"n": 0}

    def flaky_apply(ops, fence=0):
        calls["n"] += 1
        if calls["n"] == 5:
            if lost == "reply":
                real_apply(ops, fence)
            raise ConnectionError("Redis went away")
        return real_apply(ops, fence)

    pool.apply = flaky_apply
    ps = prompts([6, 11, 3], seed=11)
    outs = run(engine, [(f"r{i}", p, greedy(8)) for i, p in enumerate(ps)])
    for p, out in zip(ps, outs, strict=True):
        assert out.tokens[0] == reference(p, 8, VOCAB)
    assert calls["n"] >= 5
    assert engine.replicator.num_full_writes >= 1
    assert engine.scheduler.stats.executor_restarts == 0
    assert fake.requests == {}
    assert_pool_clean(engine)
