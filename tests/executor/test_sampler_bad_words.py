"""bad_words_token_ids in the sampler: a sequence's last id gets -inf while the output ends with
the ids before it (a one-id sequence always); the prompt does not count. SamplingParams checks
the sequences and carries them through protobuf and the JSON the scheduler stores requests in."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_BAD_WORD_SEQUENCES, SamplingParams
from pagedserve.executor.sampler import sample

EOS = (2,)


def _greedy(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> list[int]:
    return [t for t, _ in sample(logits.clone(), params, [[9, 4]] * len(params), outputs, EOS)]


def test_a_sequence_bans_its_last_id_only_after_the_rest() -> None:
    vocab = 30
    logits = torch.zeros(1, vocab)
    logits[0, 5], logits[0, 6] = 3.0, 2.0  # 5 is the argmax, 6 the runner-up
    pair = SamplingParams(temperature=0.0, bad_words_token_ids=[[7, 8, 5]])
    assert _greedy(logits, [pair], [[1, 7, 8]]) == [6], "the output ends with 7, 8: 5 is banned"
    assert _greedy(logits, [pair], [[7, 1, 8]]) == [5], "not right after 7, 8"
    assert _greedy(logits, [pair], [[8]]) == [5], "a sequence longer than the output plus one"
    # the prompt ([9, 4]) does not count, even though it ends as the sequence starts
    assert _greedy(logits, [SamplingParams(temperature=0.0, bad_words_token_ids=[[4, 5]])], [[]]) == [5]
    single = SamplingParams(temperature=0.0, bad_words_token_ids=[[5], [6]])
    assert _greedy(logits, [single], [[]]) not in ([5], [6])
    # an id past the logits is nothing to ban
    assert _greedy(logits, [SamplingParams(temperature=0.0, bad_words_token_ids=[[vocab + 3]])], [[]]) == [5]


def test_bans_are_per_row_and_hold_for_sampled_rows_and_their_logprobs() -> None:
    torch.manual_seed(1)
    vocab = 16
    logits = torch.randn(3, vocab)
    top = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, bad_words_token_ids=[[top[0]]]),
        SamplingParams(temperature=0.0),
        # sampled: every token but one banned, so that one is drawn whatever the seed
        SamplingParams(
            temperature=1.0, seed=7, logprobs=2, bad_words_token_ids=[[t] for t in range(1, vocab)]
        ),
    ]
    out = sample(logits.clone(), params, [[1]] * 3, [[]] * 3, EOS)
    assert out[0][0] != top[0] and out[1][0] == top[1]
    token, logprobs = out[2]
    assert token == 0 and logprobs is not None
    assert logprobs.logprob == pytest.approx(0.0), "the logprobs see the bans (one token left)"


def test_sequences_are_checked_and_survive_proto_and_json() -> None:
    params = SamplingParams(bad_words=["foo"], bad_words_token_ids=[[5, 6], [7]])
    params.validate(vocab_size=10)
    assert SamplingParams.from_proto(params.to_proto()) == params
    stored = SamplingParams(**json.loads(json.dumps(dataclasses.asdict(params))))
    assert stored == params
    cases = [
        ([[]], "bad_words_token_ids[0] must have 1 to 64 ids, got 0"),
        (
            [[1]] * (MAX_BAD_WORD_SEQUENCES + 1),
            "bad_words_token_ids has 129 sequences, more than the limit of 128",
        ),
        ([[1] * 65], "bad_words_token_ids[0] must have 1 to 64 ids, got 65"),
        ([[1, 10]], "bad_words_token_ids: 10 is outside the vocabulary [0, 10)"),
    ]
    for sequences, words in cases:
        with pytest.raises(InvalidArgument) as info:
            SamplingParams(bad_words_token_ids=sequences).validate(vocab_size=10)
        assert words in str(info.value) and info.value.field == "bad_words_token_ids"
