"""Swap preemption in the policy: which groups swap, CPU block accounting that keeps sharing,
resuming, falling back to recompute, and an executor restart while groups are swapped out.

Runs against the fake executor, whose toy swap space moves the (position, token) each slot
holds: a swap mapping that brings back the wrong KV fails the fake's read check. Both replicas
(in memory, Redis); fsck of the device and the CPU blocks after every run."""

from __future__ import annotations

import asyncio
import random

import pytest

from pagedserve.common.params import SamplingParams
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.request import Request, Sequence, choice_seed
from pagedserve.scheduler.swap import PreemptionMode, PreemptionPolicy

from .conftest import make_pool
from .fake_executor import FakeExecutor, reference
from .helpers import assert_pool_clean, run_all, settle

VOCAB = 1000


@pytest.fixture(params=["memory", "redis"])
def build(request, redis_client):
    """`build(num_blocks, num_cpu_blocks, block_size, **limits)` -> (engine, fake executor)."""

    def make(num_blocks: int, num_cpu_blocks: int, block_size: int = 4, **limits):
        fake = FakeExecutor(num_blocks, block_size, VOCAB, num_cpu_blocks=num_cpu_blocks)
        pool = make_pool(request.param, redis_client, num_blocks, block_size, num_cpu_blocks)
        engine = asyncio.run(SchedulerEngine.connect(fake, pool, **limits))
        return engine, fake

    return make


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def mixed_load(seed: int = 1) -> list[tuple[str, list[int], SamplingParams]]:
    """n=4 seeded-sampling requests between plain greedy ones."""
    out = []
    for i, prompt in enumerate(prompts([10, 14, 9, 18, 11, 13, 7, 16], seed=seed)):
        if i % 2:
            params = SamplingParams(max_tokens=14, temperature=0.8, seed=100 + i, n=4, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True)
        out.append((f"r{i}", prompt, params))
    return out


def expected(prompt: list[int], params: SamplingParams) -> dict[int, list[int]]:
    if params.n == 1:
        return {0: reference(prompt, params.max_tokens, VOCAB, seed=params.seed)}
    return {
        i: reference(prompt, params.max_tokens, VOCAB, seed=choice_seed(params.seed, i))
        for i in range(params.n)
    }


def watch_cpu_sharing(engine: SchedulerEngine) -> list[tuple[int, int]]:
    """(CPU-table entries, CPU blocks used) after every planned step."""
    seen: list[tuple[int, int]] = []
    sched = engine.scheduler
    plan = sched.schedule

    def schedule():
        step = plan()
        seen.append((sum(sched.blocks.cpu_ref.values()), len(sched.blocks.cpu_ref)))
        return step

    sched.schedule = schedule
    return seen


def run(engine, submissions, before_step=None):
    async def go():
        streams = [engine.submit(rid, p, s) for rid, p, s in submissions]
        results = await run_all(engine, streams)
        await settle(engine)
        return results

    return asyncio.run(go())


def assert_outputs(submissions, outs) -> None:
    for (rid, prompt, params), out in zip(submissions, outs, strict=True):
        assert out.tokens == expected(prompt, params), rid


def assert_cpu_free(engine: SchedulerEngine) -> None:
    snap = engine.pool.snapshot()
    assert snap.cpu_ref == {} and snap.cpu_tables == {}
    assert sorted(snap.cpu_free_list) == list(range(snap.num_cpu_blocks))
    assert engine.scheduler.swapped == []


def test_policy_decides_by_mode_group_and_length() -> None:
    def group(n: int, computed: int) -> list[Sequence]:
        request = Request("r", [5] * 8, SamplingParams(n=n), 0, 0, None)  # type: ignore[arg-type]
        seqs = [request.choice(i) for i in range(n)]
        for s in seqs:
            s.num_computed_tokens = computed
        return seqs

    auto = PreemptionPolicy(PreemptionMode.AUTO, swap_min_tokens=100)
    assert not auto.prefers_swap(group(1, 99))  # short and alone: recompute is cheap
    assert auto.prefers_swap(group(1, 100))  # long: swap
    assert auto.prefers_swap(group(4, 5))  # parallel sampling: swap
    assert not PreemptionPolicy(PreemptionMode.RECOMPUTE).prefers_swap(group(4, 5000))
    assert PreemptionPolicy(PreemptionMode.SWAP).prefers_swap(group(1, 1))
    # a further predicate (beam search plugs in this way)
    marked = PreemptionPolicy(PreemptionMode.AUTO, 100, swap_groups=(lambda g: g[0].request.priority == 7,))
    g = group(1, 5)
    assert not marked.prefers_swap(g)
    g[0].request.priority = 7
    assert marked.prefers_swap(g)


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_pool_too_small_swaps_and_every_output_is_exact(build, mode):
    # 24 blocks of 4 for a load that wants ~60 at once; n=4 choices share their prompt blocks.
    engine, fake = build(24, 40, preemption_mode=mode, max_num_batched_tokens=64)
    seen = watch_cpu_sharing(engine)
    load = mixed_load()
    outs = run(engine, load)
    assert_outputs(load, outs)
    stats = engine.scheduler.stats
    assert stats.swap_out_blocks > 0 and stats.swap_in_blocks > 0
    assert stats.swap_out_blocks == sum(len(s.swap_out) for s in fake.steps)
    assert stats.swap_in_blocks == sum(len(s.swap_in) for s in fake.steps)
    assert not any(s.swap_out and s.swap_in for s in fake.steps)
    # sharing kept while swapped: some CPU block was referenced by more than one choice
    assert any(entries > used for entries, used in seen)
    assert_pool_clean(engine)
    assert_cpu_free(engine)


def test_auto_recomputes_short_single_sequences(build):
    engine, fake = build(16, 40, preemption_mode="auto", swap_min_tokens=1000, max_num_batched_tokens=64)
    load = [(f"g{i}", p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts([10, 14, 20, 9, 16, 12], seed=3))]  # fmt: skip
    outs = run(engine, load)
    assert_outputs(load, outs)
    assert engine.scheduler.stats.num_preemptions > 0
    assert engine.scheduler.stats.swap_out_blocks == 0  # all n=1 and short: recompute
    assert_pool_clean(engine)


def test_swap_falls_back_to_recompute_when_cpu_blocks_are_short(build):
    engine, fake = build(24, 2, preemption_mode="swap", max_num_batched_tokens=64)
    load = mixed_load(seed=2)
    outs = run(engine, load)
    assert_outputs(load, outs)
    stats = engine.scheduler.stats
    assert stats.num_preemptions > 0
    assert stats.swap_out_blocks <= 2 * max(1, len([s for s in fake.steps if s.swap_out]))
    assert_pool_clean(engine)
    assert_cpu_free(engine)


def test_no_swap_space_means_recompute(build):
    engine, fake = build(24, 0, preemption_mode="swap", max_num_batched_tokens=64)
    load = mixed_load(seed=4)
    outs = run(engine, load)
    assert_outputs(load, outs)
    assert engine.scheduler.stats.num_preemptions > 0
    assert engine.scheduler.stats.swap_out_blocks == 0
    assert_pool_clean(engine)


def test_executor_restart_while_swapped_falls_back_to_recompute(build):
    engine, fake = build(24, 40, preemption_mode="swap", max_num_batched_tokens=64)
    sched = engine.scheduler
    execute = fake.execute_step
    restarted_with: list[int] = []

    async def step_then_maybe_restart(step):
        if sched.swapped and not restarted_with:
            restarted_with.append(sum(len(g) for g in sched.swapped))
            fake.restart()  # the new process has a new epoch: the step fails, the CPU blocks are gone
        return await execute(step)

    fake.execute_step = step_then_maybe_restart
    load = mixed_load(seed=5)
    outs = run(engine, load)
    assert restarted_with and restarted_with[0] > 0
    assert sched.stats.executor_restarts == 1
    assert_outputs(load, outs)  # nothing lost, nothing repeated
    assert_pool_clean(engine)
    assert_cpu_free(engine)


def test_abort_while_swapped_frees_the_cpu_blocks(build):
    engine, fake = build(24, 40, preemption_mode="swap", max_num_batched_tokens=64)
    load = mixed_load(seed=6)

    async def go():
        streams = {rid: engine.submit(rid, p, s) for rid, p, s in load}
        for _ in range(500):
            await engine.step()
            if engine.scheduler.swapped:
                break
        victim = engine.scheduler.swapped[0][0].request.request_id
        assert engine.scheduler.num_swapped_blocks > 0
        assert engine.abort(victim)
        rest = [rid for rid, _, _ in load if rid != victim]
        outs = await run_all(engine, [streams[rid] for rid in rest])
        await settle(engine)
        return victim, rest, outs

    victim, rest, outs = asyncio.run(go())
    assert all(group[0].request.request_id != victim for group in engine.scheduler.swapped)
    by_id = {rid: (p, s) for rid, p, s in load}
    for rid, out in zip(rest, outs, strict=True):
        assert out.tokens == expected(*by_id[rid]), rid
    assert_pool_clean(engine)
    assert_cpu_free(engine)


def test_seeded_pool_with_cpu_tables_round_trips(redis_client):
    """A whole rewrite of the replica (after a failed write) carries the CPU blocks exactly."""
    from pagedserve.scheduler.block_pool import StepOps
    from pagedserve.scheduler.memory_pool import InMemoryBlockPool
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    mem = InMemoryBlockPool(8, 4, "e", "m", num_cpu_blocks=6)
    ops = StepOps()
    ops.allocate("p", 3)
    ops.fork("p", "c")
    ops.swap_out(["p", "c"], [3, 2])
    ops.allocate("q", 2)
    mem.apply(ops)
    snap = mem.snapshot()
    assert snap.cpu_ref == {0: 2, 1: 2, 2: 1}
    pool = RedisBlockPool(redis_client, "swap-seed")
    pool.seed(snap, [], "e", "m")
    assert pool.snapshot().differences(snap) == []
    assert pool.check() == []
