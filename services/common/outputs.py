"""What generation produces, named once for every service: why a choice ended, the token
counts of a request, and one step's new tokens for one choice.

The scheduler streams `ChoiceTokens` to the gateway (as `pagedserve.v1.ChoiceTokens`); the
gateway turns them into text deltas of its own (`gateway.datatypes.ChoiceDelta`) for clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class FinishReason(IntEnum):
    """Why a choice ended; the values match `pagedserve.v1.FinishReason`."""

    NONE = 0  # still running
    STOP = 1  # EOS, a stop token id, or a stop string
    LENGTH = 2  # max_tokens or max_model_len
    ABORT = 3  # cancelled by the client or a service

    @property
    def openai_name(self) -> str | None:
        return None if self is FinishReason.NONE else self.name.lower()


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # summed over every choice
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class ChoiceTokens:
    """New tokens of one choice since its last message (usually one step's)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # one entry per token, when asked for
    finish_reason: FinishReason = FinishReason.NONE
    stop_token_id: int = -1  # the EOS or stop token id that ended the choice
    # Beam search, on the choice's last message: the sum of its tokens' log-probabilities, and
    # the length-penalized score it was ranked by (transformers' sequences_scores).
    cumulative_logprob: float | None = None
    beam_score: float | None = None
