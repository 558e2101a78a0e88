"""Beam search tests on a real executor: random Llama and Qwen2 models whose greedy continuation
reaches their EOS, a scheduler over an in-process executor that records the blocks beams hold
against what unshared copies would need, and the check of returned beams against transformers'.

The fixtures `offline` and `random_model` are in conftest.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hf_reference import reference_greedy

from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.common.sizes import cdiv
from pagedserve.common.step import StepInput, StepOutput
from pagedserve.executor.client import InProcessExecutorClient
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .helpers import Collected

VOCAB = 384
SCORE_TOLERANCE = 1e-4  # absolute; relative 1e-5 where larger
PROBE = [11, 12, 13, 14, 15]


def save_with_likely_eos(model, path: Path) -> int:
    """Make the 3rd token of PROBE's greedy continuation the model's EOS, so that beams reach it."""
    model.save_pretrained(path)
    eos = reference_greedy(path, [PROBE], 3)[0][2]
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    return eos


def make_engine(model: str | Path, redis_client, name: str, num_blocks: int, block_size: int = 4, **limits):
    executor = ExecutorEngine.from_config(
        ExecutorConfig(
            model=str(model), device="cpu", attention_backend="torch", block_size=block_size,
            num_kv_blocks=num_blocks, max_num_batched_tokens=1024,
            max_model_len=min(128, num_blocks * block_size),
        )
    )  # fmt: skip
    client = WatchingClient(executor)
    engine = asyncio.run(SchedulerEngine.connect(client, RedisBlockPool(redis_client, name), **limits))
    client.engine_ref = engine
    return engine, executor, client


class WatchingClient(InProcessExecutorClient):
    """Records, before each step, the blocks in use against what unshared beams would hold."""

    def __init__(self, engine: ExecutorEngine) -> None:
        super().__init__(engine)
        self.engine_ref: SchedulerEngine | None = None
        self.samples: list[tuple[int, int]] = []  # (blocks used, blocks n unshared copies need)

    async def execute_step(self, step: StepInput) -> StepOutput:
        sched = self.engine_ref.scheduler
        beams = [s for r in sched.requests.values() if r.beam is not None for s in r.seqs if s.block_table]
        if len(beams) > 1:
            unshared = sum(cdiv(s.num_tokens, sched.block_size) for s in beams)
            self.samples.append((sched.blocks.counts().num_used, unshared))
        return await super().execute_step(step)


def beam_params(n: int, max_tokens: int, *, eos: bool, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, n=n, use_beam_search=True, ignore_eos=not eos, **kw
    )


def assert_same_beams(out: Collected, want: list[tuple[list[int], float]], params: SamplingParams, what: str):
    got = [out.tokens[i] for i in range(len(want))]
    assert got == [tokens for tokens, _ in want], what
    for i, (tokens, score) in enumerate(want):
        cumulative, beam_score = out.scores[i]
        assert beam_score == pytest.approx(cumulative / len(tokens) ** params.length_penalty)
        if score is not None:  # (one beam: greedy, transformers gives no score)
            assert beam_score == pytest.approx(score, rel=1e-5, abs=SCORE_TOLERANCE), f"{what}: beam {i}"
        ended_by_eos = out.stop_token[i] != -1
        assert out.finish[i] == (FinishReason.STOP if ended_by_eos else FinishReason.LENGTH)
    assert out.usage.completion_tokens == sum(len(t) for t in got)
