"""The checks a request gets before anything is allocated for it: the sizes it asks for against
the gateway's limits, and its prompt's token ids against the vocabulary, prompt + max_tokens
within max_model_len, and vLLM's truncate_prompt_tokens."""

from __future__ import annotations

from pagedserve.common import structured
from pagedserve.common.chat_template import chat_bytes
from pagedserve.common.errors import InvalidArgument, show
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.datatypes import GenerationRequest, Prompt, PromptKind, TokenizerInfo


def kept_prompt_tokens(truncate: int | None, max_len: int) -> int:
    """How many of the prompt's last tokens to keep (0: all): vLLM's truncate_prompt_tokens, -1
    meaning max_model_len."""
    if truncate is None:
        return 0
    if truncate == -1:
        return max_len
    if not 1 <= truncate <= max_len:
        raise InvalidArgument(
            f"truncate_prompt_tokens must be -1 or in [1, max_model_len={max_len}], got {truncate}",
            field="truncate_prompt_tokens",
        )
    return truncate


def check_vocabulary(token_ids: list[int], vocab_size: int, field: str) -> None:
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidArgument(
            f"{field} token id {show(bad)} is outside the vocabulary [0, {vocab_size})", field=field
        )


def check_fits(num_prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    if num_prompt_tokens + max_tokens > max_len:
        raise InvalidArgument(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{num_prompt_tokens + max_tokens} tokens is more than max_model_len={max_len}",
            field="max_tokens",
        )


def check_limits(request: GenerationRequest, limits: RequestLimits) -> None:
    """The sizes a request asks for, against `RequestLimits`, before anything is built for it."""
    if not request.detokenize and request.stop:
        raise InvalidArgument("stop strings need text: they cannot go with detokenize=false", field="stop")
    if request.sampling.n > limits.max_n:
        raise InvalidArgument(
            f"n must be <= {limits.max_n} (the gateway's --max-n), got {request.sampling.n}", field="n"
        )
    if request.sampling.use_beam_search:
        if request.sampling.n > limits.max_beam_width:
            raise InvalidArgument(
                f"n must be <= {limits.max_beam_width} with use_beam_search (the gateway's "
                f"--max-beam-width), got {request.sampling.n}",
                field="n",
            )
        if request.stop:
            raise InvalidArgument("stop strings are not supported with use_beam_search", field="stop")
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            f"stop has {len(request.stop)} strings, more than the limit of {limits.max_stop_strings}",
            field="stop",
        )
    total = sum(len(s) for s in request.stop)
    if total > limits.max_stop_chars:
        raise InvalidArgument(
            f"stop strings are {total} characters in all, more than the limit of {limits.max_stop_chars}",
            field="stop",
        )
    sampling = request.sampling
    if sampling.structured_kind or sampling.structured_spec:
        # Parsed once per distinct spec (cached): a bad schema, regex or grammar is refused
        # here, never in the executor. HTTP bodies were checked under their own field names.
        structured.validate(sampling.structured_kind, sampling.structured_spec, "structured")


def check_encodable(prompt: Prompt, field: str, info: TokenizerInfo) -> None:
    """What every prompt to be tokenized gets checked for: a chat template for messages, one that
    takes tools for tools, and the tokenizer's input byte limit (`field` names the prompt)."""
    if prompt.kind is PromptKind.CHAT and not info.has_chat_template:
        raise InvalidArgument("the served model has no chat template", field="messages")
    if prompt.tools_json and not info.chat_template_supports_tools:
        raise InvalidArgument("tools: the served model's chat template does not support tools", field="tools")
    parts = {  # the error names the biggest
        field: len(prompt.text.encode()) + chat_bytes(prompt.messages),
        "tools": len(prompt.tools_json),
        "chat_template_kwargs": len(prompt.template_kwargs_json),
    }
    size = sum(parts.values())
    if info.max_input_bytes and size > info.max_input_bytes:
        biggest = max(parts, key=parts.__getitem__)
        raise InvalidArgument(
            f"{field} is {size} bytes"
            + (f" ({biggest}: {parts[biggest]})" if biggest != field else "")
            + f", more than the limit of {info.max_input_bytes}",
            field=biggest,
        )
