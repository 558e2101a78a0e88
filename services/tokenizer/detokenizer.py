"""Incremental detokenization: one sequence's generated ids to text deltas that never change."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.common.errors import InvalidArgument

if TYPE_CHECKING:
    from pagedserve.tokenizer.core import ServedTokenizer

# Prompt ids decoded before the first generated one (vLLM uses the same 5), so that a
# SentencePiece decoder sees the generated text as a continuation, not a text start.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas that never change (vLLM's scheme).

    `window` holds the ids from the prefix offset on (the older ids are dropped, so memory and
    work per token are O(window), not O(length)); `window[:read_offset]` is already emitted
    and decodes to `prefix_text`. Each step decodes the whole window and emits what goes
    beyond `prefix_text`, then slides the window to start at the old read offset. Decoding
    a few earlier ids with the new ones is what makes a SentencePiece `▁word` come out as
    ` word` and a character split over several byte tokens come out whole.

    Text is held back, and the offsets stay put, while it may still change:
    - it ends in U+FFFD: a byte-level token ended inside a multi-byte character;
    - the last id is a `<0xNN>` byte-fallback token: a run of those decodes all-or-nothing
      (one U+FFFD per byte unless the whole run is valid UTF-8), so a later byte can turn
      text already decoded from the run into U+FFFDs;
    - transformers' `clean_up_tokenization` is on and the text ends within 3 characters of a
      space: a later token can complete a pattern such as `" ."` or `" n't"`.

    Invariant (checked on random ids for byte-level BPE, SentencePiece with byte fallback,
    Unigram with the clean-up, and the bundled tokenizer): after `finish()`, the deltas joined equal
    `hf.decode(generated_ids, skip_special_tokens=...)` when there is no prompt; with a
    prompt they equal `decode(prompt + generated)[len(decode(prompt)):]`, the text the
    generated ids add (for byte-level BPE the same thing; for SentencePiece it keeps the
    leading space of a first `▁word`). A prompt whose last token leaves a character
    unfinished gives no context. Since deltas only ever extend the final text, a delta
    holds a U+FFFD only where the final decode has one.
    """

    tokenizer: ServedTokenizer
    skip_special_tokens: bool
    window: list[int] = field(default_factory=list)
    read_offset: int = 0
    prefix_text: str = ""
    held_clean_text: str = ""  # decoded but held for the space clean-up; empty when that is off
    finished: bool = False

    @classmethod
    def start(
        cls, tokenizer: ServedTokenizer, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool
    ) -> IncrementalDetokenizer:
        tokenizer.check_token_ids(prompt_token_ids, "prompt_token_ids", allow_empty=True)
        detok = cls(tokenizer, skip_special_tokens)
        context = detok._prompt_context(prompt_token_ids)
        if context:
            detok.window = context
            detok.read_offset = len(context)
            detok.prefix_text = detok._decode(context)
        return detok

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids; return the text that became final (possibly "")."""
        if self.finished:
            raise InvalidArgument("the sequence already finished", field="token_ids")
        self.tokenizer.check_token_ids(token_ids, allow_empty=True)
        new_ids = self._kept(token_ids)
        if not new_ids:
            return ""
        self.window.extend(new_ids)
        if new_ids[-1] in self.tokenizer.byte_fallback_ids:
            return ""  # the byte run may go on; decoding now would be wasted work
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush all held text; the sequence takes no more ids afterwards."""
        if self.finished:
            return ""
        text = self._emit(final=True) if self.read_offset < len(self.window) else ""
        text += self._clean_up("", final=True)
        self.finished = True
        return text

    def _emit(self, final: bool) -> str:
        new_text = self._decode(self.window)
        if not final and new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self.prefix_text) :]
        # Slide: the ids emitted just now become the next step's prefix.
        self.window = self.window[self.read_offset :]
        self.read_offset = len(self.window)
        self.prefix_text = self._decode(self.window) if not final else ""
        return self._clean_up(delta, final)

    def _clean_up(self, delta: str, final: bool) -> str:
        """Apply `clean_up_tokenization` to text that no later token can change.

        Its patterns start with a space and are at most 4 characters long, so text that does
        not end within 3 characters of a space can be cleaned on its own: no match spans the cut.
        """
        if not self.tokenizer.cleans_up_spaces:
            return delta
        text = self.held_clean_text + delta
        cut = len(text)
        if not final:
            while cut > 0:
                start = max(0, cut - 3)
                space = text.rfind(" ", start, cut)
                if space < 0:
                    break
                cut = space
        self.held_clean_text = text[cut:]
        return self.tokenizer.hf.clean_up_tokenization(text[:cut])

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode_raw(token_ids, self.skip_special_tokens)

    def _kept(self, token_ids: Iterable[int]) -> list[int]:
        # Dropping skipped ids up front is what decode does too (they never reach the
        # decoder), and it keeps a window from starting with ids that decode to nothing.
        if not self.skip_special_tokens:
            return list(token_ids)
        skipped = self.tokenizer.skipped_ids
        return [t for t in token_ids if t not in skipped]

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids to decode before the generated ones, or [] when the
        prompt's tail could still change with more ids (its text ends mid-character)."""
        tail: list[int] = []
        for token in reversed(prompt_token_ids):  # the last kept ids, plus the one before them
            if not (self.skip_special_tokens and token in self.tokenizer.skipped_ids):
                tail.append(token)
                if len(tail) > PROMPT_CONTEXT_TOKENS:
                    break
        tail.reverse()
        byte_ids = self.tokenizer.byte_fallback_ids
        if tail and tail[-1] in byte_ids:
            return []
        # Start outside a run of byte tokens, which decodes differently when cut.
        start = max(0, len(tail) - PROMPT_CONTEXT_TOKENS)
        while 0 < start < len(tail) and tail[start - 1] in byte_ids and tail[start] in byte_ids:
            start += 1
        context = tail[start:]
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            return []
        return context
