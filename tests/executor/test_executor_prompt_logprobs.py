"""Prompt logprobs in the executor: every prompt position's log_softmax, equal to transformers'
dense forward, whether the prompt runs in one step or in chunks, beside requests that do not ask."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from executor_harness import GREEDY, chunk_sizes, make_prompts
from hf_reference import reference_prompt_logprobs

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput

K = 5
TOL = 1e-4  # float32 on CPU: the paged and the dense forward differ by rounding only


def run_prompt(engine, request_id: str, prompt: list[int], chunks: list[int], sampling, other=None):
    """Computes `prompt` in `chunks` steps (a plain request `other` rides in every step); returns
    every PromptLogprobs chunk the steps answered for `request_id`, and the sampled token."""
    bs = engine.pool.block_size
    blocks = list(range(-(-len(prompt) // bs) + 1))
    other_blocks = list(range(len(blocks), len(blocks) + 8))
    answered, sampled = [], None
    computed = 0
    for step_id, n in enumerate(chunks):
        new, cached = [], []
        if computed == 0:
            new.append(NewRequestData(request_id, prompt, [], sampling, blocks, 0, n))
            if other is not None:
                new.append(NewRequestData("other", other, [], GREEDY, other_blocks, 0, len(other)))
        else:
            cached.append(CachedRequestData(request_id, [], n, computed))
            if other is not None:
                other_done = len(other) + step_id - 1
                cached.append(CachedRequestData("other", [], 1, other_done))
        out = engine.execute_step(StepInput(step_id, engine.epoch, new, cached))
        computed += n
        answered.extend(out.prompt_logprobs)
        assert all(p.request_id == request_id for p in out.prompt_logprobs), "only the asking request"
        for s in out.sampled:
            if s.request_id == request_id:
                sampled = s.token_id
    return answered, sampled


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_prompt_logprobs_match_transformers(tiny_model_dir, make_engine, num_chunks: int) -> None:
    model = tiny_model_dir("llama")
    engine = make_engine(model)
    prompt = make_prompts((29,), engine.info().vocab_size, seed=4)[0]
    other = make_prompts((6,), engine.info().vocab_size, seed=5)[0]
    sampling = replace(GREEDY, prompt_logprobs=K)
    chunks, sampled = run_prompt(engine, "p", prompt, chunk_sizes(len(prompt), num_chunks), sampling, other)

    assert len(chunks) == num_chunks, "each chunk answers for its own positions"
    assert chunks[0].first_token_index == 1
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.first_token_index == before.first_token_index + len(before.logprobs)
    entries = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in entries] == prompt[1:], "one entry per prompt token after the first"

    want = reference_prompt_logprobs(model, prompt)  # [P - 1, V]
    got = torch.tensor([lp.logprob for lp in entries])
    chosen = want.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert torch.allclose(got, chosen, atol=TOL, rtol=0), (got - chosen).abs().max()
    for i, lp in enumerate(entries):  # the prompt token's rank in the whole vocabulary
        near = ((want[i] - chosen[i]).abs() < 10 * TOL).sum().item()
        if near == 1:
            assert lp.rank == (want[i] > chosen[i]).sum().item() + 1, f"position {i}"
        assert lp.rank is not None and lp.rank >= 1
    top_values, top_ids = want.topk(K + 1, dim=-1)
    for i, lp in enumerate(entries):
        assert len(lp.top) == K
        values = torch.tensor([v for _, v in lp.top])
        assert torch.allclose(values, top_values[i, :K], atol=TOL, rtol=0)
        gaps = (top_values[i, :K] - top_values[i, 1 : K + 1]).tolist()
        for j, (token_id, _) in enumerate(lp.top):
            if gaps[j] > 10 * TOL and (j == 0 or gaps[j - 1] > 10 * TOL):  # no near-tie around it
                assert token_id == top_ids[i, j].item(), f"position {i}, rank {j + 1}"
    assert sampled is not None, "the last prompt position still samples"


def test_prompt_logprobs_do_not_change_the_sampled_tokens(tiny_model_dir, make_engine) -> None:
    model = tiny_model_dir("qwen2")
    prompt = make_prompts((17,), 512, seed=6)[0]
    plain = run_prompt(make_engine(model), "p", prompt, [17], GREEDY)[1]
    engine = make_engine(model)
    chunks, asked = run_prompt(engine, "p", prompt, [9, 8], replace(GREEDY, prompt_logprobs=0))
    assert asked == plain
    assert all(lp.top == [] for c in chunks for lp in c.logprobs), "k = 0: the token's own logprob only"
    assert sum(len(c.logprobs) for c in chunks) == 16


def test_a_one_token_prompt_has_no_prompt_logprobs(tiny_model_dir, make_engine) -> None:
    engine = make_engine(tiny_model_dir("llama"))
    chunks, sampled = run_prompt(engine, "p", [7], [1], replace(GREEDY, prompt_logprobs=3))
    assert chunks == [] and sampled is not None


def test_more_than_20_is_refused(tiny_model_dir, make_engine) -> None:
    engine = make_engine(tiny_model_dir("llama"))
    step = StepInput(
        0, engine.epoch, [NewRequestData("p", [5, 6], [], replace(GREEDY, prompt_logprobs=21), [0], 0, 2)]
    )
    with pytest.raises(InvalidArgument, match=r"prompt_logprobs must be in \[0, 20\], got 21"):
        engine.execute_step(step)
    assert engine.requests == {}
