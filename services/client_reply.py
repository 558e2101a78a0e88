"""What the Python SDK's calls return (`pagedserve.client` re-exports every class here), and
the conversions from the gateway's protobuf replies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedserve.common.outputs import Usage
from pagedserve.v1 import common_pb2, gateway_pb2

FINISH_REASONS = {1: "stop", 2: "length", 3: "abort"}


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)
    rank: int | None = None  # 1-based, in the whole vocabulary (prompt logprobs only)


@dataclass(slots=True)
class Choice:
    """A finished choice: all its text and token ids."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float | None = None  # beam search: the sum of its tokens' log-probabilities
    beam_score: float | None = None  # beam search: the length-penalized score it was ranked by


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    model: str
    choices: list[Choice]
    usage: Usage
    # With prompt_logprobs=k: entry i is prompt token i + 1's (the first token has none)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice; `finish_reason` is set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float | None = None  # beam search, on the last delta
    beam_score: float | None = None  # beam search, on the last delta


@dataclass(slots=True)
class GenerationDelta:
    """One message of a stream; `usage` is set on the last one."""

    request_id: str
    model: str
    choices: list[ChoiceDelta]
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # on the first delta, when asked


@dataclass(slots=True)
class Tokenized:
    """A prompt's token ids, as a generation request with it would be tokenized."""

    token_ids: list[int]
    max_model_len: int  # the longest prompt + output the gateway accepts
    token_strs: list[str] | None = None  # with return_token_strs=True: each id's vocabulary entry


def tokenized_from_proto(
    request: gateway_pb2.TokenizePromptRequest, reply: gateway_pb2.TokenizePromptResponse
) -> Tokenized:
    strs = list(reply.token_strs) if request.return_token_strs else None
    return Tokenized(list(reply.token_ids), reply.max_model_len, strs)


@dataclass(slots=True)
class ModelCard:
    id: str
    max_model_len: int
    root: str = ""  # the model served under this name (the gateway's --model)


def _logprobs(items: Sequence[common_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            lp.token_id,
            lp.logprob,
            [TopLogprob(t.token_id, t.logprob) for t in lp.top],
            lp.rank if lp.HasField("rank") else None,
        )
        for lp in items
    ]


def _usage(msg: common_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


def _choice_fields(c) -> tuple:
    """A choice (whole, or one message's delta) in the field order Choice and ChoiceDelta share."""
    return (
        c.index,
        c.text,
        list(c.token_ids),
        FINISH_REASONS.get(c.finish_reason),
        _logprobs(c.logprobs),
        c.cumulative_logprob if c.HasField("cumulative_logprob") else None,
        c.beam_score if c.HasField("beam_score") else None,
    )


def result_from_proto(msg: gateway_pb2.GenerateResult) -> GenerationResult:
    return GenerationResult(
        request_id=msg.request_id,
        model=msg.model,
        choices=[Choice(*_choice_fields(c)) for c in msg.choices],
        usage=_usage(msg.usage),
        prompt_logprobs=_logprobs(msg.prompt_logprobs),
    )


def delta_from_proto(msg: gateway_pb2.GenerateResponse) -> GenerationDelta:
    return GenerationDelta(
        request_id=msg.request_id,
        model=msg.model,
        choices=[ChoiceDelta(*_choice_fields(c)) for c in msg.choices],
        usage=_usage(msg.usage) if msg.HasField("usage") else None,
        prompt_logprobs=_logprobs(msg.prompt_logprobs),
    )
