"""The gateway core's dataclasses: a validated request, and what it streams back.

The gRPC servicer and the HTTP layer convert to and from these at the edge; the engine
(`engine.py`) sees nothing else.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from enum import IntEnum

from pagedserve.common.errors import PagedServeError
from pagedserve.common.outputs import ChoiceTokens, FinishReason, Usage  # noqa: F401  (the gateway's names)
from pagedserve.common.params import SamplingParams


class PromptKind(IntEnum):
    TEXT = 1
    TOKEN_IDS = 2
    CHAT = 3


@dataclass(slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls_json: str = ""  # an assistant turn's `tool_calls`, as JSON text
    tool_call_id: str = ""  # a tool turn: the call it answers
    name: str = ""


@dataclass(slots=True)
class Prompt:
    """Exactly one of text, token ids or chat messages, as `kind` says."""

    kind: PromptKind
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    messages: list[ChatMessage] = field(default_factory=list)
    add_special_tokens: bool = True  # text only
    add_generation_prompt: bool = True  # chat only
    tools_json: str = ""  # chat only: OpenAI's `tools` list as JSON text, for the template
    continue_final_message: bool = False  # chat only: leave the last message open
    template_kwargs_json: str = ""  # chat only: extra template variables, a JSON object's text

    @property
    def is_empty(self) -> bool:
        if self.kind is PromptKind.TEXT:
            return self.text == ""
        if self.kind is PromptKind.TOKEN_IDS:
            return not self.token_ids
        return not self.messages


@dataclass(slots=True)
class GenerationRequest:
    """One request as the engine takes it, from gRPC or HTTP."""

    prompt: Prompt
    sampling: SamplingParams
    model: str = ""  # "" means the served model
    stop: list[str] = field(default_factory=list)
    request_id: str = ""  # "" gets a generated id
    skip_special_tokens: bool = True
    priority: int = 0
    # True when the client gave no max_tokens and wants the rest of the context (chat).
    max_tokens_to_fill: bool = False
    # Resolve token strings for logprobs (the HTTP API shows tokens as text, gRPC as ids).
    logprob_token_strings: bool = False
    detokenize: bool = True  # False: token ids only, no text (gRPC); stop strings are refused
    include_stop_str_in_output: bool = False  # a matched stop string ends the text (vLLM's extra)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (vLLM's extra)


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str | None = None  # set when the request asked for token strings


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)
    token: str | None = None
    rank: int | None = None  # 1-based, in the whole vocabulary (prompt logprobs only)


@dataclass(slots=True)
class PromptLogprobs:
    """A prompt's log-probabilities: every token but the first has one (nothing comes before it)."""

    first_token_id: int
    first_token: str | None = None  # set when the request asked for token strings
    logprobs: list[TokenLogprob] = field(default_factory=list)  # entry i: prompt token i + 1


@dataclass(slots=True)
class ChoiceDelta:
    """New output for one choice; `finish_reason` is set on its last delta."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    # Beam search, on the last delta: the sum of the tokens' log-probabilities, and the
    # length-penalized score the beams were ranked by.
    cumulative_logprob: float | None = None
    beam_score: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """One message of a generation stream; `usage` is set on the last one only."""

    request_id: str
    choices: list[ChoiceDelta] = field(default_factory=list)
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # on the first message only (of each prompt)
    prompt_index: int = 0  # which prompt of a completions batch; choices are numbered across all
    prompt_logprobs: PromptLogprobs | None = None  # once, when sampling.prompt_logprobs asked


@dataclass(slots=True)
class ModelInfo:
    name: str  # a name clients may use in `model`
    max_model_len: int
    root: str = ""  # the model it serves: --model as given


# ---- errors only the gateway raises (the others are in pagedserve.common.errors) ----


class Unauthenticated(PagedServeError):
    """No API key, or the wrong one."""

    code = "UNAUTHENTICATED"
    http_status = 401


def check_bearer(header: bytes | None, api_key: str) -> None:
    """Raise `Unauthenticated` unless `header` is "Bearer <api_key>" (compared in constant time)."""
    if header is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), api_key.encode()):
        raise Unauthenticated("invalid API key")


class PayloadTooLarge(PagedServeError):
    """The HTTP body is over --max-request-bytes; it is refused without being read."""

    code = "INVALID_ARGUMENT"
    http_status = 413


class UnsupportedMediaType(PagedServeError):
    """A JSON route got a body that does not say it is JSON."""

    code = "INVALID_ARGUMENT"
    http_status = 415


class ReadTimeout(PagedServeError):
    """The HTTP client stopped sending its body for longer than the read timeout."""

    code = "DEADLINE_EXCEEDED"
    http_status = 408


@dataclass(slots=True, frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    max_input_bytes: int
    chat_template_supports_tools: bool = False


@dataclass(slots=True)
class SchedulerUpdate:
    """One Submit stream message, as the engine sees it."""

    choices: list[ChoiceTokens]
    usage: Usage | None
    cached_prompt_tokens: int
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # entry i: prompt token i + 1


@dataclass(slots=True)
class DetokenizeItem:
    """New ids for one sequence on the shared Detokenize stream (see tokenizer.proto)."""

    key: str
    token_ids: list[int]
    prompt_token_ids: list[int] = field(default_factory=list)
    finish: bool = False
    skip_special_tokens: bool = True


@dataclass(slots=True)
class CompletedChoice:
    """A choice with all its deltas joined (the unary form)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    cumulative_logprob: float | None = None  # beam search
    beam_score: float | None = None  # beam search


@dataclass(slots=True)
class CompletedRequest:
    request_id: str
    choices: list[CompletedChoice]
    usage: Usage
    prompt_token_ids: list[int] = field(default_factory=list)  # the first prompt's
    # Every prompt's ids, by its index in a completions batch.
    prompt_token_ids_by_prompt: dict[int, list[int]] = field(default_factory=dict)
    prompt_logprobs_by_prompt: dict[int, PromptLogprobs] = field(default_factory=dict)

    @classmethod
    def start(cls, request_id: str, n: int) -> CompletedRequest:
        return cls(request_id, [CompletedChoice(index=i) for i in range(n)], Usage())

    def add(self, output: RequestOutput) -> None:
        if output.prompt_token_ids is not None:
            self.prompt_token_ids_by_prompt[output.prompt_index] = output.prompt_token_ids
            if output.prompt_index == 0:
                self.prompt_token_ids = output.prompt_token_ids
        if output.prompt_logprobs is not None:
            self.prompt_logprobs_by_prompt[output.prompt_index] = output.prompt_logprobs
        for delta in output.choices:
            choice = self.choices[delta.index]
            choice.text += delta.text
            choice.token_ids.extend(delta.token_ids)
            choice.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not FinishReason.NONE:
                choice.finish_reason = delta.finish_reason
            if delta.beam_score is not None:
                choice.cumulative_logprob, choice.beam_score = delta.cumulative_logprob, delta.beam_score
        if output.usage is not None:
            self.usage = output.usage
