"""Beam search through the scheduler's hard cases, on a real executor against transformers'
`generate(num_beams=n)`: a search preempted, taken over by another scheduler, or across an
executor restart starts over and gives the same beams; requests that can never run are refused
naming n; an abort mid-search ends every beam; beam groups that do not fit one step take turns.
fsck is clean after each.
"""

from __future__ import annotations

import asyncio

import pytest
from hf_reference import reference_beams, reference_greedy

from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.executor.client import InProcessExecutorClient
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .beam_harness import (
    VOCAB,
    assert_same_beams,
    beam_params,
    make_engine,
)
from .helpers import assert_pool_clean, drain, run_all, settle
from .test_with_executor import make_prompts

pytestmark = pytest.mark.usefixtures("offline")  # nothing is looked up on a hub


def test_a_preempted_beam_request_starts_over_and_gives_the_same_beams(random_model, redis_client):
    path, eos = random_model
    # 3 beams of up to 24 + 12 tokens: 9 blocks each unshared; 20 blocks in all, with a plain
    # request competing for them, so that the newest (the beams) gets preempted.
    engine, executor, _ = make_engine(
        path, redis_client, f"beam-preempt-{path.name}", num_blocks=20, max_num_batched_tokens=64
    )
    prompt, other = make_prompts([24, 30], VOCAB, seed=9)
    params = beam_params(3, 12, eos=False, length_penalty=1.0)
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def go():
        streams = [engine.submit("plain", other, plain), engine.submit("beam", prompt, params)]
        outs = await run_all(engine, streams, timeout=120)
        await settle(engine)
        return outs

    out_plain, out = asyncio.run(go())
    assert engine.scheduler.stats.num_preemptions > 0
    assert_same_beams(out, reference_beams(path, prompt, 3, 12), params, "preempted")
    assert out_plain.tokens[0] == reference_greedy(path, [other], 40)[0]
    assert_pool_clean(engine)


def test_beams_taken_over_by_another_scheduler_start_over(random_model, redis_client):
    """A scheduler dies with beams in flight (their blocks and state in Redis): the next one
    drops them, restarts the search from the prompt when the client re-attaches, and gets
    transformers' beams; nothing leaks."""
    from pagedserve.scheduler.lease import Lease
    from pagedserve.scheduler.recovery import ChoiceProgress

    path, eos = random_model
    pool_id = f"beam-takeover-{path.name}"
    executor = ExecutorEngine.from_config(
        ExecutorConfig(
            model=str(path), device="cpu", attention_backend="torch", block_size=4,
            num_kv_blocks=128, max_num_batched_tokens=1024, max_model_len=128,
        )
    )  # fmt: skip
    prompt = make_prompts([14], VOCAB, seed=11)[0]
    params = beam_params(3, 10, eos=True, early_stopping="never", length_penalty=1.3)

    async def connect(ttl: float) -> SchedulerEngine:
        lease = Lease(redis_client, pool_id, ttl=ttl)
        assert lease.acquire() == 0.0
        client = InProcessExecutorClient(executor)
        return await SchedulerEngine.connect(client, RedisBlockPool(redis_client, pool_id), lease=lease)

    async def go():
        first = await connect(0.3)
        first.submit("beam", prompt, params)
        request = first.scheduler.requests["beam"]
        while not (len(request.seqs) == 3 and len(request.seqs[0].output_token_ids) >= 3):
            await first.step()
        await first.step()
        await first.replicator.flush()
        assert first.pool.counts().num_used > 0  # beams hold blocks in Redis
        await asyncio.sleep(0.35)  # kill -9: the first never writes again; its lease lapses
        second = await connect(5.0)
        assert list(second.scheduler.detached) == ["beam"]
        stream = second.attach("beam", prompt, params, 0, [ChoiceProgress(i, []) for i in range(3)])
        second.start()
        out = await asyncio.wait_for(drain(stream), 60)
        await settle(second)
        return out, second

    out, second = asyncio.run(go())
    want = reference_beams(path, prompt, 3, 10, length_penalty=1.3, early_stopping="never", eos_token_id=eos)
    assert_same_beams(out, want, params, "taken over")
    assert_pool_clean(second)
    assert executor.requests == {}


def test_beams_recomputed_after_the_executor_restarts(random_model, redis_client):
    from .test_with_executor import RestartingClient

    path, eos = random_model

    def executor() -> ExecutorEngine:
        return ExecutorEngine.from_config(
            ExecutorConfig(
                model=str(path), device="cpu", attention_backend="torch", block_size=4,
                num_kv_blocks=96, max_num_batched_tokens=1024, max_model_len=128,
            )
        )  # fmt: skip

    first, second = executor(), executor()
    client = RestartingClient(first, second, at=6)
    pool = RedisBlockPool(redis_client, f"beam-restart-{path.name}")
    engine = asyncio.run(SchedulerEngine.connect(client, pool))
    prompt = make_prompts([9], VOCAB, seed=12)[0]
    params = beam_params(3, 10, eos=True)

    async def go():
        outs = await run_all(engine, [engine.submit("beam", prompt, params)], timeout=60)
        await settle(engine)
        return outs[0]

    out = asyncio.run(go())
    assert engine.scheduler.stats.executor_restarts == 1
    assert_same_beams(out, reference_beams(path, prompt, 3, 10, eos_token_id=eos), params, "restarted")
    assert_pool_clean(engine)
    assert second.requests == {}


@pytest.mark.parametrize(
    ("limits", "n", "max_tokens", "words"),
    [
        ({"num_blocks": 30}, 4, 30, "needs 38 KV blocks"),  # 2 shared + 4 beams x (11 - 2) blocks of 4
        ({"max_num_seqs": 3}, 4, 4, "do not fit one step"),
        ({"max_num_batched_tokens": 2}, 3, 4, "do not fit one step"),
        ({"vocab_size": 9}, 5, 4, "candidate tokens"),  # 2 x 5 candidates
    ],
)
def test_beam_requests_that_can_never_run_are_refused_naming_n(limits, n, max_tokens, words) -> None:
    from pagedserve.common.errors import InvalidArgument
    from pagedserve.scheduler.admission import check_admissible
    from pagedserve.scheduler.config import SchedulerLimits

    base = dict(
        max_num_seqs=64, max_num_batched_tokens=256, max_queued_requests=8, max_model_len=128,
        num_blocks=1000, block_size=4, eos_token_ids=frozenset({2}), vocab_size=VOCAB,
    )  # fmt: skip
    params = beam_params(n, max_tokens, eos=True)
    with pytest.raises(InvalidArgument) as err:
        check_admissible(SchedulerLimits(**{**base, **limits}), "r", [5] * 11, params)
    assert err.value.field == "n" and words in err.value.message
    check_admissible(SchedulerLimits(**base), "r", [5] * 11, params)  # fits the default limits


def test_abort_mid_search_ends_every_beam_and_frees_the_blocks(random_model, redis_client):
    path, _ = random_model
    engine, executor, _ = make_engine(path, redis_client, f"beam-abort-{path.name}", num_blocks=128)
    prompt = make_prompts([10], VOCAB, seed=13)[0]

    async def go():
        stream = engine.submit("beam", prompt, beam_params(4, 60, eos=False))
        request = engine.scheduler.requests["beam"]
        engine.start()
        while not (len(request.seqs) == 4 and len(request.seqs[0].output_token_ids) >= 4):
            await asyncio.sleep(0.002)
        assert engine.scheduler.blocks.counts().num_used > 0
        assert engine.abort("beam")
        out = await asyncio.wait_for(drain(stream), 30)
        await settle(engine)
        return out

    out = asyncio.run(go())
    assert out.finish == {i: FinishReason.ABORT for i in range(4)}
    assert all(tokens == [] for tokens in out.tokens.values())
    assert_pool_clean(engine)
    assert executor.requests == {}


def test_beam_groups_that_do_not_fit_one_step_take_turns(random_model, redis_client):
    """With room for 4 sequences per step, two searches of 3 beams alternate (a group runs
    whole or not at all); a beam not run right after its parent is sent whole, not forked."""
    path, eos = random_model
    engine, executor, _ = make_engine(
        path, redis_client, f"beam-turns-{path.name}", num_blocks=128, max_num_seqs=4
    )
    prompts = make_prompts([7, 12], VOCAB, seed=14)
    params = beam_params(3, 8, eos=True, early_stopping=True)
    sent_whole = []
    build = engine.scheduler._build_step

    def spy(planned, copies):
        step = build(planned, copies)
        if step.step_input is not None:
            assert len(step.seqs) <= 4
            sent_whole.extend(
                r.request_id
                for r in step.step_input.new_requests
                if not r.fork_of and "#b0" not in r.request_id
            )
        return step

    engine.scheduler._build_step = spy

    async def go():
        streams = [engine.submit(f"t{i}", p, params) for i, p in enumerate(prompts)]
        outs = await run_all(engine, streams, timeout=60)
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    for i, out in enumerate(outs):
        want = reference_beams(path, prompts[i], 3, 8, early_stopping=True, eos_token_id=eos)
        assert_same_beams(out, want, params, f"t{i}")
    assert sent_whole  # some beams waited a step and were sent whole
    assert_pool_clean(engine)
    assert executor.requests == {}


def test_a_search_that_fails_fails_its_request_alone_and_frees_its_blocks(
    random_model, redis_client, monkeypatch
):
    """A beam request whose ranking raises (a bug, or a numeric corner the checks missed) ends
    with INTERNAL and gives its blocks back; the step and the other requests go on."""
    from pagedserve.common.errors import PagedServeError
    from pagedserve.scheduler.beam import BeamSearch

    path, _ = random_model
    engine, executor, _ = make_engine(path, redis_client, f"beam-fail-{path.name}", num_blocks=128)
    prompt, other = make_prompts([10, 12], VOCAB, seed=15)
    advance, calls = BeamSearch.advance, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OverflowError("a numeric corner")
        return advance(self, *args)

    monkeypatch.setattr(BeamSearch, "advance", failing)
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def go():
        beam = engine.submit("beam", prompt, beam_params(3, 30, eos=False))
        rest = engine.submit("plain", other, plain)
        engine.start()
        with pytest.raises(PagedServeError, match="beam search failed: OverflowError") as info:
            await asyncio.wait_for(drain(beam), 30)
        assert info.value.code == "INTERNAL"
        out = await asyncio.wait_for(drain(rest), 60)
        await settle(engine)
        return out

    out = asyncio.run(go())
    assert len(out.tokens[0]) == 20 and out.finish == {0: FinishReason.LENGTH}
    assert_pool_clean(engine)
    assert executor.requests == {}
