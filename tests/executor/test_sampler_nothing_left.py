"""A row the masks leave with no token at all (allowed_token_ids against bad words or a grammar,
min_tokens against stop tokens) samples its first EOS id with logprob 0 and so ends, rather than
an arbitrary id with a NaN logprob; the other rows of the batch are untouched. The gateway
refuses what it can see ahead (`SamplingParams.check_samplable`). A temperature too small to
divide the logits by (they would overflow to inf and NaN) is greedy."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.executor.sampler import sample

EOS = (3, 1)
VOCAB = 20


class _BanAll:
    """A grammar mask that allows nothing in its rows."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows

    def apply(self, logits: torch.Tensor) -> None:
        logits[self.rows] = float("-inf")


def test_a_row_with_nothing_left_samples_eos_with_a_finite_logprob() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    top = logits.argmax(-1).tolist()
    params = [
        # allowed_token_ids all banned as one-id bad words: greedy and seeded
        SamplingParams(temperature=0.0, logprobs=2, allowed_token_ids=[5, 6], bad_words_token_ids=[[5], [6]]),
        SamplingParams(temperature=0.8, seed=4, logprobs=0, allowed_token_ids=[7], bad_words_token_ids=[[7]]),
        # min_tokens with only stop tokens allowed
        SamplingParams(temperature=0.0, min_tokens=2, allowed_token_ids=[9], stop_token_ids=[9]),
        SamplingParams(temperature=0.0, logprobs=1),  # an ordinary row beside them
    ]
    out = sample(logits.clone(), params, [[2]] * 4, [[], [], [4], []], EOS)
    assert [t for t, _ in out] == [EOS[0], EOS[0], EOS[0], top[3]]
    for token, logprobs in (out[0], out[1]):
        assert logprobs is not None and logprobs.token_id == token and logprobs.logprob == 0.0
    assert out[0][1].top[0] == (EOS[0], 0.0)
    assert math.isinf(out[0][1].top[1][1]), "the alternative past the one token left is -inf"
    assert out[3][1].logprob == pytest.approx(logits[3].log_softmax(-1).max().item())


def test_a_grammar_and_allowed_token_ids_that_share_nothing_end_with_eos() -> None:
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(temperature=0.0, allowed_token_ids=[5]), SamplingParams(temperature=1.0)]
    out = sample(logits.clone(), params, [[2]] * 2, [[], []], EOS, mask=_BanAll([0]))
    assert out[0][0] == EOS[0]
    # with no EOS id at all nothing is forced (and nothing fails)
    out = sample(logits[:1].clone(), params[:1], [[2]], [[]], (), mask=_BanAll([0]))
    assert 0 <= out[0][0] < VOCAB


def test_check_samplable_names_the_field_that_leaves_nothing() -> None:
    cases = [
        (
            SamplingParams(allowed_token_ids=[5, 6], bad_words=["x"], bad_words_token_ids=[[5], [6], [7, 8]]),
            "bad_words bans every id of allowed_token_ids",
            "bad_words",
        ),
        (
            SamplingParams(allowed_token_ids=[5], bad_words_token_ids=[[5]]),
            "bad_words_token_ids bans every id of allowed_token_ids",
            "bad_words_token_ids",
        ),
        (
            SamplingParams(min_tokens=1, allowed_token_ids=[3, 6], stop_token_ids=[6]),
            "min_tokens=1 needs a token that does not end the sequence",
            "min_tokens",
        ),
        (
            SamplingParams(min_tokens=1, allowed_token_ids=[3, 6], bad_words_token_ids=[[6]]),
            "every id of allowed_token_ids left after bad words is a stop_token_id or EOS",
            "min_tokens",
        ),
    ]
    for params, words, field in cases:
        with pytest.raises(InvalidArgument) as info:
            params.check_samplable(EOS)
        assert words in str(info.value) and info.value.field == field
    fine = [
        # a pair bans 6 only at times
        SamplingParams(allowed_token_ids=[5, 6], bad_words_token_ids=[[5], [5, 6]]),
        SamplingParams(min_tokens=1, allowed_token_ids=[3], ignore_eos=True),  # EOS does not end it
        SamplingParams(allowed_token_ids=[3]),  # EOS alone is fine without min_tokens
        SamplingParams(bad_words_token_ids=[[5]]),
    ]
    for params in fine:
        params.check_samplable(EOS)


def test_a_temperature_too_small_to_divide_by_samples_the_argmax_with_finite_logprobs() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, VOCAB)
    params = [
        SamplingParams(temperature=1e-38, logprobs=1),
        SamplingParams(temperature=1e-6, seed=3, logprobs=1),
    ]
    assert all(p.greedy for p in params)
    out = sample(logits.clone(), params, [[2]] * 2, [[], []], EOS)
    assert [t for t, _ in out] == logits.argmax(-1).tolist()
    for _, logprobs in out:
        # as for temperature 0: the model's own distribution (temperature counts as 1)
        assert logprobs is not None and math.isfinite(logprobs.logprob)
    assert out[0][1].logprob == pytest.approx(logits[0].log_softmax(-1).max().item())
