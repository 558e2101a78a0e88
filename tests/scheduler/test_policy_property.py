"""Random workloads through the policy: shared prefixes, n > 1, priorities, chunking, tight
pools and aborts at random steps. The fake executor checks every KV read; after every step the
pool's invariants hold; every request ends exactly as the reference says (or aborted), and the
pool is clean at the end."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.memory_pool import InMemoryBlockPool
from pagedserve.scheduler.request import choice_seed

from .fake_executor import FakeExecutor, reference
from .helpers import drain

VOCAB = 1000
BLOCK_SIZE = 4
PREFIXES = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25]]

request_st = st.tuples(
    st.integers(-1, len(PREFIXES) - 1),  # shared prefix (-1: none)
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=14),  # own tokens
    st.integers(1, 3),  # n
    st.integers(1, 8),  # max_tokens
    st.integers(0, 2),  # priority
    st.one_of(st.none(), st.integers(0, 12)),  # abort before this step (None: never)
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_st, min_size=1, max_size=10),
    num_blocks=st.integers(40, 80),
    budget=st.integers(4, 64),
    max_num_seqs=st.integers(1, 8),
)
def test_random_workloads_finish_exactly(requests, num_blocks, budget, max_num_seqs):
    fake = FakeExecutor(num_blocks, BLOCK_SIZE, VOCAB)
    pool = InMemoryBlockPool()

    async def go():
        engine = await SchedulerEngine.connect(
            fake, pool, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs
        )
        streams, specs, aborts = [], [], {}
        for i, (prefix, own, n, max_tokens, priority, abort_at) in enumerate(requests):
            prompt = (PREFIXES[prefix] if prefix >= 0 else []) + own
            params = SamplingParams(
                max_tokens=max_tokens, temperature=1.0, seed=100 + i, n=n, ignore_eos=True
            )
            streams.append(engine.submit(f"q{i}", prompt, params, priority=priority))
            specs.append((prompt, params))
            if abort_at is not None:
                aborts.setdefault(abort_at, []).append(f"q{i}")
        sched = engine.scheduler
        steps = 0
        while sched.has_work():
            for rid in aborts.pop(steps, []):
                engine.abort(rid)
            await engine.step()
            steps += 1
            await engine.replicator.ship(sched)  # what update() logged, written now instead of next step
            await engine.replicator.flush()
            assert pool.check() == [] and sched.blocks.check() == []
            assert sched.blocks.snapshot().differences(pool.snapshot()) == []
            assert steps < 2000, "no progress"
        outs = [await asyncio.wait_for(drain(s), 1) for s in streams]
        await engine.replicator.ship(sched)
        await engine.replicator.flush()
        return engine, specs, outs

    engine, specs, outs = asyncio.run(go())
    for (prompt, params), out in zip(specs, outs, strict=True):
        assert sorted(out.finish) == list(range(params.n))
        for i in range(params.n):
            want = reference(prompt, params.max_tokens, VOCAB, seed=choice_seed(params.seed, i))
            if out.finish[i] == FinishReason.ABORT:
                assert out.tokens.get(i, []) == want[: len(out.tokens.get(i, []))]
            else:
                assert out.finish[i] == FinishReason.LENGTH and out.tokens[i] == want
    assert pool.counts().num_used == 0 and engine.scheduler.blocks.ref == {}
    assert fake.requests == {}
