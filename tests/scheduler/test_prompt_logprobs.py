"""Prompt logprobs through the scheduler and the REAL executor, on a real Redis: a prompt whose
blocks are cached is computed again (every position needs its logits), chunks come back in
order, n > 1 computes them once in the prompt sequence, a preempted prompt does not repeat
them; values equal transformers' dense forward; fsck is clean afterwards."""

from __future__ import annotations

import asyncio

import torch
from hf_reference import reference_greedy as hf_greedy
from hf_reference import reference_prompt_logprobs

from pagedserve.common.outputs import FinishReason
from pagedserve.executor.client import InProcessExecutorClient
from pagedserve.scheduler import scheduler as scheduler_module
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .helpers import assert_pool_clean, run_all, settle
from .test_with_executor import TINY_VOCAB, connect, greedy, make_executor, make_prompts

TOL = 1e-4


def check_against_transformers(model, prompt: list[int], entries, k: int) -> None:
    assert [lp.token_id for lp in entries] == prompt[1:]
    want = reference_prompt_logprobs(model, prompt)  # [P - 1, V]
    got = torch.tensor([lp.logprob for lp in entries])
    chosen = want.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert torch.allclose(got, chosen, atol=TOL, rtol=0), (got - chosen).abs().max()
    assert all(len(lp.top) == k for lp in entries)
    top = torch.tensor([[v for _, v in lp.top] for lp in entries])
    assert torch.allclose(top, want.topk(k, dim=-1).values, atol=TOL, rtol=0)


def test_prompt_logprobs_skip_the_prefix_cache_and_come_in_order(tiny_model, redis_client):
    executor = make_executor(tiny_model, num_kv_blocks=64, block_size=4)
    pool = RedisBlockPool(redis_client, "prompt-logprobs")
    # A budget of 8 tokens a step: the 27-token prompt runs in 4 chunks.
    engine = connect(InProcessExecutorClient(executor), pool, max_num_batched_tokens=8)
    prompt = make_prompts([27], TINY_VOCAB, seed=11)[0]

    async def go():
        plain = await run_all(engine, [engine.submit("plain", prompt, greedy(4))])
        asked = await run_all(
            engine,
            [
                engine.submit("asked", prompt, greedy(4, prompt_logprobs=3)),
                engine.submit("n2", prompt, greedy(4, prompt_logprobs=2, n=2)),
            ],
        )
        await settle(engine)
        return plain + asked

    plain, asked, n2 = asyncio.run(go())
    assert asked.tokens[0] == plain.tokens[0], "same greedy tokens with or without prompt logprobs"
    assert asked.usage.cached_prompt_tokens == 0, "no prefix-cache hit for a request that needs them"
    assert engine.scheduler.stats.prefix_hit_tokens == 0
    check_against_transformers(tiny_model, prompt, asked.prompt_logprobs, 3)
    assert asked.prompt_logprobs_messages == 1, "sent once, whole"
    check_against_transformers(tiny_model, prompt, n2.prompt_logprobs, 2)
    assert n2.tokens[0] == n2.tokens[1] == plain.tokens[0]
    assert plain.prompt_logprobs == []
    assert_pool_clean(engine)


def test_a_preempted_prompt_gives_each_entry_once(tiny_model, redis_client):
    # 6 blocks of 4: two 14-token prompts cannot both grow, so the newer one is preempted.
    executor = make_executor(tiny_model, num_kv_blocks=8, block_size=4)
    engine = connect(
        InProcessExecutorClient(executor), RedisBlockPool(redis_client, "prompt-logprobs-preempt"),
        max_num_batched_tokens=6,
    )  # fmt: skip
    prompts = make_prompts([14, 14], TINY_VOCAB, seed=12)

    async def go():
        streams = [engine.submit(f"r{i}", p, greedy(12, prompt_logprobs=1)) for i, p in enumerate(prompts)]
        outs = await run_all(engine, streams, timeout=120)
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    assert engine.scheduler.stats.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.finish[0] == FinishReason.LENGTH
        check_against_transformers(tiny_model, prompt, out.prompt_logprobs, 1)
    assert_pool_clean(engine)


def test_prompt_rows_per_step_are_capped(tiny_model, redis_client, monkeypatch):
    monkeypatch.setattr(scheduler_module, "MAX_PROMPT_LOGPROB_ROWS", 5)
    executor = make_executor(tiny_model, num_kv_blocks=64, block_size=4)
    steps: list[list[int]] = []  # rows the executor computed per step
    original = executor.execute_step

    def counting(step, claimed=None):
        out = original(step, claimed)
        steps.append([len(p.logprobs) for p in out.prompt_logprobs])
        return out

    executor.execute_step = counting
    engine = connect(
        InProcessExecutorClient(executor), RedisBlockPool(redis_client, "prompt-logprobs-cap"),
        max_num_batched_tokens=64,
    )  # fmt: skip
    prompts = make_prompts([23, 17, 9], TINY_VOCAB, seed=13)

    async def go():
        streams = [
            engine.submit("a", prompts[0], greedy(3, prompt_logprobs=2)),
            engine.submit("b", prompts[1], greedy(3, prompt_logprobs=2)),
            engine.submit("plain", prompts[2], greedy(3)),
        ]
        outs = await run_all(engine, streams)
        await settle(engine)
        return outs

    a, b, plain = asyncio.run(go())
    assert max(sum(rows) for rows in steps) <= 5, steps
    check_against_transformers(tiny_model, prompts[0], a.prompt_logprobs, 2)
    check_against_transformers(tiny_model, prompts[1], b.prompt_logprobs, 2)
    assert plain.prompt_logprobs == [] and plain.tokens[0] == hf_greedy(tiny_model, [prompts[2]], 3)[0]
    assert_pool_clean(engine)
