"""The checks a prompt's token ids get before anything is allocated for them: the vocabulary,
prompt + max_tokens within max_model_len, and vLLM's truncate_prompt_tokens."""

from __future__ import annotations

from pagedserve.common.errors import InvalidArgument


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
            f"{field} token id {bad} is outside the vocabulary [0, {vocab_size})", field=field
        )


def check_fits(num_prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    if num_prompt_tokens + max_tokens > max_len:
        raise InvalidArgument(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{num_prompt_tokens + max_tokens} tokens is more than max_model_len={max_len}",
            field="max_tokens",
        )
