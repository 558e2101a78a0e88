"""`bad_words` as token sequences: the gateway tokenizes each word (the executor bans by ids).

A word is tokenized as written (leading spaces dropped) and again after one space, since a
word inside a sentence usually starts with its space token. As vLLM does, the second form
counts only when it is as long as the first and starts with another token: where the space
makes a token of its own, its sequence would ban the word's first token after any space.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import MAX_BAD_WORD_TOKENS
from pagedserve.gateway.datatypes import Prompt, PromptKind


async def bad_word_ids(words: list[str], encode: Callable[[Prompt], Awaitable[list[int]]]) -> list[list[int]]:
    """Each word's token sequences, in word order (no special tokens added)."""

    def text(t: str) -> Prompt:
        return Prompt(PromptKind.TEXT, text=t, add_special_tokens=False)

    stripped = [w.lstrip() for w in words]
    plain = await asyncio.gather(*(encode(text(w)) for w in stripped))
    spaced = await asyncio.gather(*(encode(text(" " + w)) for w in stripped))
    out: list[list[int]] = []
    for i, (ids, space_ids) in enumerate(zip(plain, spaced, strict=True)):
        if len(ids) > MAX_BAD_WORD_TOKENS:
            raise InvalidArgument(
                f"bad_words[{i}] is {len(ids)} tokens, more than the limit of {MAX_BAD_WORD_TOKENS}",
                field="bad_words",
            )
        if ids:
            out.append(ids)
        if space_ids and len(space_ids) == len(ids) and space_ids[0] != ids[0]:
            out.append(space_ids)
    return out
