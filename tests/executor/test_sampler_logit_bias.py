"""logit_bias: the sampler adds it after the penalties, in every path; SamplingParams checks it and
carries it through protobuf and the JSON the scheduler stores requests in."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_LOGIT_BIAS, SamplingParams
from pagedserve.executor.sampler import sample

EOS = (2,)


def test_bias_steers_greedy_and_sampled_rows_and_leaves_the_rest():
    torch.manual_seed(3)
    vocab = 40
    logits = torch.randn(4, vocab)
    plain = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),  # all but forced
        SamplingParams(temperature=0.0, logit_bias={plain[1]: -100.0}),  # banned: the runner-up wins
        SamplingParams(temperature=1.0, seed=5, logit_bias={11: 100.0}),
        SamplingParams(temperature=0.0),  # no bias: exact argmax, even beside biased rows
    ]
    out = sample(logits.clone(), params, [[1]] * 4, [[]] * 4, EOS)
    second = logits[1].clone()
    second[plain[1]] = -float("inf")
    assert [t for t, _ in out] == [7, int(second.argmax()), 11, plain[3]]


def test_bias_and_penalties_add_up_and_logprobs_see_the_bias():
    torch.manual_seed(4)
    vocab = 20
    logits = torch.randn(1, vocab)
    # a small bias on the token a presence penalty pushed down brings it back exactly
    p = SamplingParams(temperature=0.0, presence_penalty=1.5, logit_bias={5: 1.5}, logprobs=3)
    ((token, lp),) = sample(logits.clone(), [p], [[1]], [[5]], EOS)
    want = logits[0].to(torch.float64).log_softmax(-1)  # penalty and bias cancel on token 5
    assert token == int(logits[0].argmax())
    assert lp.logprob == pytest.approx(want[token].item(), abs=1e-5)
    assert [t for t, _ in lp.top] == want.topk(3).indices.tolist()


def test_a_bias_past_the_vocabulary_is_inert_in_the_sampler():
    logits = torch.tensor([[0.0, 1.0, 0.5]])
    out = sample(logits, [SamplingParams(temperature=0.0, logit_bias={9: 100.0})], [[1]], [[]], EOS)
    assert out[0][0] == 1


def test_validation_names_the_field_and_the_limit():
    SamplingParams(logit_bias={0: -100, 99: 100.0}).validate(100)
    cases = [
        (SamplingParams(logit_bias={3: 100.5}), "logit_bias[3] must be in [-100, 100], got 100.5"),
        (SamplingParams(logit_bias={3: float("nan")}), "logit_bias[3] must be in [-100, 100], got nan"),
        (
            SamplingParams(logit_bias={100: 1.0}),
            "logit_bias: token id 100 is outside the vocabulary [0, 100)",
        ),
        (SamplingParams(logit_bias={-1: 1.0}), "logit_bias: token id -1 is outside the vocabulary [0, 100)"),
        (
            SamplingParams(logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS + 1), 1.0)),
            f"logit_bias has {MAX_LOGIT_BIAS + 1} tokens, more than the limit of {MAX_LOGIT_BIAS}",
        ),
        (
            SamplingParams(temperature=0.0, use_beam_search=True, n=2, logit_bias={1: 1.0}),
            "logit_bias is not supported with use_beam_search",
        ),
    ]
    for params, words in cases:
        with pytest.raises(InvalidArgument, match=re.escape(words)) as info:
            params.validate(100)
        assert info.value.field == "logit_bias"


def test_it_survives_protobuf_and_the_stored_json():
    params = SamplingParams(temperature=0.5, logit_bias={3: 2.5, 17: -100.0})
    assert SamplingParams.from_proto(params.to_proto()) == params
    assert SamplingParams.from_proto(SamplingParams().to_proto()).logit_bias == {}
    stored = json.loads(json.dumps(dataclasses.asdict(params)))  # as the scheduler keeps request states
    assert stored["logit_bias"] == {"3": 2.5, "17": -100.0}
    assert SamplingParams(**stored) == params


def test_allowed_token_ids_restrict_greedy_and_sampled_rows():
    torch.manual_seed(6)
    vocab = 30
    logits = torch.randn(3, vocab)
    allowed = [4, 9, 17]
    params = [
        SamplingParams(temperature=0.0, allowed_token_ids=allowed),
        SamplingParams(temperature=1.5, seed=2, allowed_token_ids=allowed, logprobs=2),
        SamplingParams(temperature=0.0),
    ]
    best = max(allowed, key=lambda t: logits[0, t].item())
    seen = set()
    for step in range(20):
        out = sample(logits.clone(), params, [[1]] * 3, [[0] * step] * 3, EOS)
        assert out[0][0] == best and out[2][0] == int(logits[2].argmax())
        seen.add(out[1][0])
        assert all(t in allowed for t, _ in out[1][1].top)  # the others are -inf
    assert seen <= set(allowed) and len(seen) > 1
    with pytest.raises(
        InvalidArgument, match=re.escape("allowed_token_ids: 30 is outside the vocabulary [0, 30)")
    ):
        SamplingParams(allowed_token_ids=[3, 30]).validate(30)
    with pytest.raises(InvalidArgument, match="allowed_token_ids has 4097 ids, more than the limit of 4096"):
        SamplingParams(allowed_token_ids=[1] * 4097).validate(30)
    with_ids = SamplingParams(allowed_token_ids=[3, 5])
    assert SamplingParams.from_proto(with_ids.to_proto()) == with_ids


def test_the_same_request_steps_again_with_its_tensors_kept():
    # one SamplingParams object per request, every step: its ids become tensors once
    from pagedserve.executor import logit_bias

    p = SamplingParams(temperature=0.0, logit_bias={3: 100.0}, allowed_token_ids=[3, 4])
    logits = torch.zeros(1, 10)
    for _ in range(3):
        assert sample(logits.clone(), [p], [[1]], [[]], EOS)[0][0] == 3
    assert logit_bias._id_tensors._entries[id(p)][0] is p
    # a smaller vocabulary cuts the ids again rather than reuse the cached ones
    assert sample(torch.zeros(1, 4), [p], [[1]], [[]], EOS)[0][0] == 3
    assert sample(torch.zeros(1, 3), [p], [[1]], [[]], EOS)[0][0] in (0, 1, 2)  # both ids cut: row left as is
