"""The scheduler driving the REAL executor (an in-process `ExecutorEngine`), on a real Redis.

Greedy outputs must equal transformers' `generate` token for token, whatever preemption,
prefix caching, forking or executor restarts happened on the way; afterwards fsck is clean
and every block is free or cached.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from hf_reference import reference_greedy as hf_greedy

from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import StepInput, StepOutput
from pagedserve.executor.client import InProcessExecutorClient
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .conftest import TINY_VOCAB
from .helpers import assert_pool_clean, drain, run_all, settle


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def make_executor(model: str | Path, num_kv_blocks: int, block_size: int = 8) -> ExecutorEngine:
    return ExecutorEngine.from_config(
        ExecutorConfig(
            model=str(model), device="cpu", attention_backend="torch", block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_batched_tokens=4096,
            max_model_len=min(num_kv_blocks * block_size, 256),  # one sequence must fit the pool
        )
    )  # fmt: skip


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def make_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def connect(client, pool, **limits) -> SchedulerEngine:
    return asyncio.run(SchedulerEngine.connect(client, pool, **limits))


def test_64_requests_through_a_small_pool_match_generate(bundled_model_path, redis_client):
    executor = make_executor(bundled_model_path, num_kv_blocks=40, block_size=8)
    vocab = executor.info().vocab_size
    lengths = [2 + (i * 37) % 47 for i in range(64)]  # 2..48 tokens, mixed
    prompts = make_prompts(lengths, vocab, seed=0)
    max_tokens = 6
    pool = RedisBlockPool(redis_client, "with-executor-64")
    engine = connect(InProcessExecutorClient(executor), pool, max_num_batched_tokens=512)

    async def go():
        streams = [engine.submit(f"r{i}", p, greedy(max_tokens)) for i, p in enumerate(prompts)]
        outs = await run_all(engine, streams, timeout=240)
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    want = hf_greedy(bundled_model_path, prompts, max_tokens)
    for i, (out, ref) in enumerate(zip(outs, want, strict=True)):
        assert out.tokens[0] == ref, f"request r{i} (prompt of {lengths[i]} tokens)"
        assert out.finish[0] == FinishReason.LENGTH
    assert engine.scheduler.stats.num_preemptions > 0
    assert_pool_clean(engine)
    assert executor.requests == {}  # the executor was told to forget every sequence


def test_prefix_hit_and_parallel_sampling_on_the_real_executor(tiny_model, redis_client):
    executor = make_executor(tiny_model, num_kv_blocks=64, block_size=4)
    engine = connect(InProcessExecutorClient(executor), RedisBlockPool(redis_client, "with-executor-prefix"))
    prefix = make_prompts([20], TINY_VOCAB, seed=1)[0]  # 5 full blocks of 4
    a, b = prefix + [7, 8, 9], prefix + [10, 11]
    c = make_prompts([11], TINY_VOCAB, seed=2)[0]  # n=2 shares 10 tokens, the partial block is copied

    async def go():
        first = await run_all(engine, [engine.submit("a", a, greedy(5, logprobs=2))])
        rest = await run_all(
            engine, [engine.submit("b", b, greedy(5)), engine.submit("c", c, greedy(5, n=2))]
        )
        await settle(engine)
        return first + rest

    out_a, out_b, out_c = asyncio.run(go())
    ref_a, ref_b, ref_c = hf_greedy(tiny_model, [a, b, c], 5)
    assert out_a.tokens[0] == ref_a and out_b.tokens[0] == ref_b
    assert [lp.token_id for lp in out_a.logprobs[0]] == ref_a  # logprobs ride along, one per token
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in out_a.logprobs[0])
    assert out_b.logprobs[0] == []
    assert out_b.usage.cached_prompt_tokens == 20
    assert out_c.tokens[0] == ref_c and out_c.tokens[1] == ref_c
    assert_pool_clean(engine)


@pytest.mark.parametrize("budget", [64, 28])
def test_a_prefix_sent_many_times_at_once_matches_generate(tiny_model, redis_client, budget):
    # The requests after the first share the prefix blocks the first one's step computes, in
    # that very step (budget 64: the executor writes every token's K/V of a layer before any
    # attention reads the pool) or in the step planned while it runs (28).
    executor = make_executor(tiny_model, num_kv_blocks=64, block_size=4)
    pool = RedisBlockPool(redis_client, f"with-executor-burst-{budget}")
    engine = connect(InProcessExecutorClient(executor), pool, max_num_batched_tokens=budget)
    prefix = make_prompts([24], TINY_VOCAB, seed=3)[0]  # 6 full blocks of 4
    prompts = [prefix + own for own in make_prompts([3, 5, 2, 4, 3, 6], TINY_VOCAB, seed=4)]

    async def go():
        outs = await run_all(engine, [engine.submit(f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)])
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    for i, (out, ref) in enumerate(zip(outs, hf_greedy(tiny_model, prompts, 6), strict=True)):
        assert out.tokens[0] == ref, f"request r{i}"
    assert [o.usage.cached_prompt_tokens for o in outs] == [0] + [24] * 5
    assert_pool_clean(engine)


def test_abort_mid_generation_frees_blocks(tiny_model, redis_client):
    executor = make_executor(tiny_model, num_kv_blocks=64)
    engine = connect(InProcessExecutorClient(executor), RedisBlockPool(redis_client, "with-executor-abort"))
    prompt = make_prompts([12], TINY_VOCAB, seed=3)[0]

    async def go():
        stream = engine.submit("long", prompt, greedy(200))
        engine.start()
        while engine.scheduler.stats.generated_tokens < 5:
            await asyncio.sleep(0.005)
        assert engine.scheduler.blocks.counts().num_used > 0
        assert engine.abort("long")
        out = await asyncio.wait_for(drain(stream), 30)
        await settle(engine)
        return out

    out = asyncio.run(go())
    assert out.finish[0] == FinishReason.ABORT and 5 <= len(out.tokens[0]) < 200
    assert_pool_clean(engine)
    assert executor.requests == {}


class RestartingClient(InProcessExecutorClient):
    """Replaces its engine with a fresh one (a new epoch, an empty pool) before step `at`."""

    def __init__(self, engine: ExecutorEngine, replacement: ExecutorEngine, at: int) -> None:
        super().__init__(engine)
        self.replacement = replacement
        self.at = at
        self.steps = 0

    async def execute_step(self, step: StepInput) -> StepOutput:
        self.steps += 1
        if self.steps == self.at:
            self.engine = self.replacement
        return await super().execute_step(step)


def test_executor_restart_mid_run_keeps_greedy_outputs(tiny_model, redis_client):
    first, second = make_executor(tiny_model, 48), make_executor(tiny_model, 48)
    client = RestartingClient(first, second, at=6)
    engine = connect(client, RedisBlockPool(redis_client, "with-executor-restart"), max_num_batched_tokens=64)
    prompts = make_prompts([5, 17, 9, 30, 12, 3], TINY_VOCAB, seed=4)

    async def go():
        streams = [engine.submit(f"r{i}", p, greedy(10)) for i, p in enumerate(prompts)]
        outs = await run_all(engine, streams, timeout=120)
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    for out, ref in zip(outs, hf_greedy(tiny_model, prompts, 10), strict=True):
        assert out.tokens[0] == ref
    assert engine.scheduler.stats.executor_restarts == 1
    assert engine.scheduler.epoch == second.epoch != first.epoch
    assert_pool_clean(engine)
    assert second.requests == {}
