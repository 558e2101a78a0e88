"""The scheduler's own admission checks of what a gateway should have refused already: the
request id (1 to 256 printable characters) and allowed_token_ids that leave nothing to sample."""

from __future__ import annotations

import pytest

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.scheduler.admission import check_admissible
from pagedserve.scheduler.config import SchedulerLimits

LIMITS = SchedulerLimits(
    max_num_seqs=8, max_num_batched_tokens=64, max_queued_requests=8, max_model_len=64,
    num_blocks=100, block_size=4, eos_token_ids=frozenset({2}), vocab_size=32,
)  # fmt: skip


@pytest.mark.parametrize(
    ("request_id", "params", "field", "words"),
    [
        ("", SamplingParams(), "request_id", "request_id must be 1 to 256 printable characters"),
        ("r" * 257, SamplingParams(), "request_id", "got 257 characters"),
        ("a\x1fb", SamplingParams(), "request_id", "no control characters"),
        (
            "r",
            SamplingParams(allowed_token_ids=[4], bad_words_token_ids=[[4]]),
            "bad_words_token_ids",
            "bans every id",
        ),
        (
            "r",
            SamplingParams(min_tokens=2, allowed_token_ids=[2]),
            "min_tokens",
            "needs a token that does not end",
        ),
    ],
)
def test_what_the_gateway_should_have_refused_is_refused(request_id, params, field, words) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_admissible(LIMITS, request_id, [5, 6], params)
    assert err.value.field == field and words in err.value.message


def test_the_longest_id_and_a_samplable_request_are_admitted() -> None:
    check_admissible(LIMITS, "r" * 256, [5, 6], SamplingParams(min_tokens=2, allowed_token_ids=[2, 7]))
