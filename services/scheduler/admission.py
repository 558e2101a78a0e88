"""Admission control: a request that can never run is refused up front, with the limits,
before anything is queued or allocated."""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.common.request_ids import check_request_id
from pagedserve.common.sizes import cdiv
from pagedserve.scheduler.beam import num_candidates
from pagedserve.scheduler.config import SchedulerLimits


def check_admissible(
    limits: SchedulerLimits, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams
) -> None:
    """Raise InvalidArgument (naming the field and the limit) unless the request could run.

    prompt + max_tokens must fit max_model_len, and the whole request must fit the pool at
    once: with n > 1 choices, the prompt's full blocks are shared and each choice needs the rest."""
    check_request_id(request_id)
    if not prompt_token_ids:
        raise InvalidArgument("prompt_token_ids must be non-empty", field="prompt_token_ids")
    sampling.validate(limits.vocab_size)
    sampling.check_samplable(limits.eos_token_ids)
    bad = next((t for t in prompt_token_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidArgument(
            f"prompt_token_ids: {bad} is outside the vocabulary [0, {limits.vocab_size})",
            field="prompt_token_ids",
        )
    if sampling.use_beam_search:
        _check_beam_width(limits, sampling)
    total = len(prompt_token_ids) + sampling.max_tokens
    if total > limits.max_model_len:
        raise InvalidArgument(
            f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} "
            f"exceeds max_model_len={limits.max_model_len}",
            field="max_tokens",
        )
    bs = limits.block_size
    per_sequence = cdiv(total, bs)
    n = sampling.n
    shared = (len(prompt_token_ids) - 1) // bs if n > 1 else 0  # full blocks of the shared prompt
    needed = shared + n * (per_sequence - shared)
    if needed > limits.num_blocks:
        what = "beams" if sampling.use_beam_search else "choices"
        choices = f" for each of n={n} {what}" if n > 1 else ""
        raise InvalidArgument(
            f"prompt + max_tokens = {total} tokens{choices} needs {needed} KV blocks of {bs} tokens; "
            f"the pool has {limits.num_blocks}",
            field="n" if n > 1 and per_sequence <= limits.num_blocks else "max_tokens",
        )


def _check_beam_width(limits: SchedulerLimits, sampling: SamplingParams) -> None:
    """Every beam of a request runs in the same step, and each step ranks candidates that
    must be distinct tokens: the width must fit a step and the vocabulary."""
    n = sampling.n
    step = min(limits.max_num_seqs, limits.max_num_batched_tokens)
    if n > step:
        raise InvalidArgument(
            f"n={n} beams do not fit one step: the scheduler runs at most {step} sequences per step "
            "(--max-num-seqs, --max-num-batched-tokens)",
            field="n",
        )
    num_eos = 0 if sampling.ignore_eos else len(limits.eos_token_ids)
    if num_candidates(n, num_eos) > limits.vocab_size:
        raise InvalidArgument(
            f"n={n} beams need {num_candidates(n, num_eos)} candidate tokens per step; the vocabulary "
            f"has {limits.vocab_size}",
            field="n",
        )
