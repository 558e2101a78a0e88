"""The batched sampler against plain per-row references (Python loops, float64): greedy, seeds,
penalties and logprobs (top-k, top-p, min-p, temperature and min_tokens:
test_sampler_distribution.py).

Exact where the answer is exact (greedy tokens, seeded tokens).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.common.params import SamplingParams
from pagedserve.executor.sampler import apply_penalties, sample, step_seed

EOS = (2,)


# --- plain references -------------------------------------------------------------------


def ref_penalties(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    counts = Counter(output)
    seen = set(prompt) | set(output)
    out = []
    for token, x in enumerate(row):
        if token in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= counts[token] * p.frequency_penalty
        if counts[token]:
            x -= p.presence_penalty
        out.append(x)
    return out


# --- greedy -----------------------------------------------------------------------------


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0)] * 6
    out = sample(logits, params, [[1, 3]] * 6, [[]] * 6, EOS)
    assert [t for t, _ in out] == logits.argmax(-1).tolist()
    assert all(lp is None for _, lp in out)


def test_greedy_fast_path_equals_the_general_path():
    # Ties on purpose (few distinct values) and a NaN row: the fast path must pick what the general
    # path (penalties, temperature, masks) picks for greedy rows, which is argmax's first maximum.
    gen = torch.Generator().manual_seed(4)
    logits = torch.randint(0, 4, (16, 300), generator=gen).float()
    logits[3, 17] = float("nan")
    fast = sample(logits, [SamplingParams(temperature=0.0)] * 16, [[]] * 16, [[]] * 16, EOS)
    # logprobs on one row turns the fast path off; every row stays greedy.
    general_params = [SamplingParams(temperature=0.0)] * 15 + [SamplingParams(temperature=0.0, logprobs=1)]
    general = sample(logits, general_params, [[]] * 16, [[]] * 16, EOS)
    assert [t for t, _ in fast] == [t for t, _ in general] == logits.argmax(-1).tolist()
    assert fast[3][0] == 17


def test_greedy_bf16_logits():
    torch.manual_seed(1)
    logits = torch.randn(4, 300).to(torch.bfloat16)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 4, [[]] * 4, [[]] * 4, EOS)
    assert [t for t, _ in out] == logits.float().argmax(-1).tolist()


def test_greedy_rows_in_mixed_batch_and_top_k_1():
    torch.manual_seed(2)
    logits = torch.randn(5, 40)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.8, top_k=1),  # top_k 1 is greedy
        SamplingParams(temperature=1.5, top_p=0.5),
        SamplingParams(temperature=0.0, logprobs=2),  # no fast path
    ]
    out = sample(logits, params, [[]] * 5, [[]] * 5, EOS)
    argmax = logits.argmax(-1).tolist()
    assert [out[i][0] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_input_logits_untouched():
    torch.manual_seed(3)
    logits = torch.randn(3, 30)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.7, repetition_penalty=1.5, top_p=0.8, min_tokens=4),
        SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=3),
        SamplingParams(temperature=1.0, top_k=4, min_p=0.1),
    ]
    sample(logits, params, [[1, 5, 7]] * 3, [[5, 5, 9]] * 3, EOS)
    assert torch.equal(logits, before)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="logits rows"):
        sample(torch.zeros(2, 8), [SamplingParams()], [[]], [[]], EOS)


# --- seeds ------------------------------------------------------------------------------

VOCAB = 64
TARGET = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=1234)


def target_logits(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(VOCAB, generator=g) * 2.0  # [V]


def run_target_alone(steps: int) -> list[int]:
    output: list[int] = []
    for step in range(steps):
        token, _ = sample(target_logits(step).unsqueeze(0), [TARGET], [[4, 5, 6]], [list(output)], EOS)[0]
        output.append(token)
    return output


def run_target_in_batch(steps: int, position: int, global_seed: int) -> list[int]:
    """TARGET at `position` among 7 others: seeded, unseeded, greedy; all rows advance."""
    torch.manual_seed(global_seed)
    others = [
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=1.2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.6, top_p=0.9, seed=1235),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=1.0, seed=1234, top_k=10),  # same seed, other params
        SamplingParams(temperature=2.0, presence_penalty=0.5),
    ]
    params = others[:position] + [TARGET] + others[position:]
    outputs: list[list[int]] = [[] for _ in params]
    prompts = [[4, 5, 6] if i == position else [i, i + 1] for i in range(len(params))]
    for step in range(steps):
        logits = torch.randn(len(params), VOCAB) * 3.0  # [8, V]
        logits[position] = target_logits(step)
        out = sample(logits, params, prompts, [list(o) for o in outputs], EOS)
        for o, (token, _) in zip(outputs, out, strict=True):
            o.append(token)
    return outputs[position]


def test_seeded_reproducible_across_batch_composition():
    alone = run_target_alone(8)
    assert run_target_in_batch(8, position=0, global_seed=1) == alone
    assert run_target_in_batch(8, position=5, global_seed=2) == alone
    assert run_target_in_batch(8, position=7, global_seed=3) == alone


def test_seeded_resend_gives_same_token():
    """A re-sent step (same outputs so far, e.g. after preemption) samples the same token."""
    logits = target_logits(0).unsqueeze(0)
    torch.manual_seed(10)
    first = sample(logits, [TARGET], [[4]], [[9, 9, 1]], EOS)
    torch.manual_seed(11)
    again = sample(logits, [TARGET], [[4]], [[9, 9, 1]], EOS)
    assert first == again


def test_different_seeds_differ():
    flat = torch.zeros(1, 1000)  # uniform: a seed alone decides the token

    def run(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        output: list[int] = []
        for _ in range(8):
            output.append(sample(flat, [p], [[]], [list(output)], EOS)[0][0])
        return output

    a, b = run(1), run(2)
    assert a != b
    assert len(set(a)) > 1  # the step is mixed into the seed
    assert run(1) == a


def test_step_seed_stable_and_distinct():
    # Pinned: a seeded request must sample the same tokens after an executor restart or upgrade.
    assert step_seed(0, 0) == 6017775124710473527
    assert step_seed(1234, 5) == 8283773070198799620
    values = {step_seed(s, n) for s in range(-3, 20) for n in range(20)}
    assert len(values) == 23 * 20
    assert all(0 <= v < 2**63 for v in values)


# --- penalties --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_penalties_match_reference(data):
    vocab = data.draw(st.integers(2, 30))
    num_seqs = data.draw(st.integers(1, 4))
    logit = st.floats(-10, 10, allow_nan=False, width=32)
    token = st.integers(0, vocab - 1)
    rows = [data.draw(st.lists(logit, min_size=vocab, max_size=vocab)) for _ in range(num_seqs)]
    prompts = [data.draw(st.lists(token, max_size=12)) for _ in range(num_seqs)]
    outputs = [data.draw(st.lists(token, max_size=12)) for _ in range(num_seqs)]
    params = [
        SamplingParams(
            repetition_penalty=data.draw(st.sampled_from([1.0, 0.5, 1.3, 2.0])),
            presence_penalty=data.draw(st.sampled_from([0.0, -1.0, 0.7, 2.0])),
            frequency_penalty=data.draw(st.sampled_from([0.0, -0.5, 0.4, 2.0])),
        )
        for _ in range(num_seqs)
    ]
    got = apply_penalties(torch.tensor(rows), params, prompts, outputs)
    want = [ref_penalties(r, p, pr, o) for r, p, pr, o in zip(rows, params, prompts, outputs, strict=True)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_penalties_leave_other_rows_exact_and_drive_greedy():
    torch.manual_seed(4)
    logits = torch.randn(4, 25) * 3
    prompts = [[1, 2, 3], [4, 4], [0, 24], [5]]
    outputs = [[3, 3, 7], [8], [24, 24, 24], [5, 6]]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.0),
    ]
    penalized = apply_penalties(logits, params, prompts, outputs)
    assert torch.equal(penalized[1], logits[1]) and torch.equal(penalized[3], logits[3])
    want = [ref_penalties(logits[i].tolist(), params[i], prompts[i], outputs[i]) for i in range(4)]
    out = sample(logits, params, prompts, outputs, EOS)
    assert [t for t, _ in out] == [max(range(25), key=row.__getitem__) for row in want]


# --- logprobs ---------------------------------------------------------------------------


def test_logprobs_match_log_softmax_before_truncation():
    torch.manual_seed(11)
    vocab = 30
    logits = torch.randn(5, vocab) * 2
    prompts = [[1, 2], [3], [4, 4], [5], [6]]
    outputs = [[7, 7, 8], [], [9], [10], [11, 11]]
    params = [
        SamplingParams(temperature=0.7, top_k=3, logprobs=5, repetition_penalty=1.2, seed=1),
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.3, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_p=0.5, logprobs=20, presence_penalty=0.5),
    ]
    out = sample(logits, params, prompts, outputs, EOS)
    assert out[3][1] is None
    for i, ((token, lp), p) in enumerate(zip(out, params, strict=True)):
        if p.logprobs is None:
            continue
        penalized = ref_penalties(logits[i].tolist(), p, prompts[i], outputs[i])
        scale = p.temperature if p.temperature > 0 else 1.0
        ref = torch.tensor(penalized, dtype=torch.float64).div(scale).log_softmax(-1)  # [V]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-4)
        want_top = ref.topk(p.logprobs)
        assert [t for t, _ in lp.top] == want_top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want_top.values.tolist(), abs=1e-4)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:], strict=False))
    # top_k=3 truncated the sampling but not the logprobs: alternatives 4 and 5 are finite.
    assert len(out[0][1].top) == 5 and all(v > -math.inf for _, v in out[0][1].top)
    assert out[0][0] in [t for t, _ in out[0][1].top[:3]]
    assert out[1][0] == out[1][1].top[0][0]  # greedy takes the best
